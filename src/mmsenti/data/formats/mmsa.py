"""CMU-MOSI and CMU-MOSEI in the MMSA release: sentiment scores in [-3, 3] (regression).

Two sources are read:

* the feature pickles most code uses, ``aligned_50.pkl`` / ``unaligned_50.pkl`` (in the root or
  ``Processed/``): a dict ``{"train", "valid", "test"}`` of dicts holding ``raw_text``, ``audio`` and ``vision``
  (N, T, D) sequences with ``audio_lengths`` / ``vision_lengths``, ``text`` (GloVe or BERT features),
  ``regression_labels`` and ``id``. Sequences are cut to their lengths; ``features`` holds ``audio`` and
  ``vision`` (and ``text`` with ``text_features: true``). Non-finite values (MOSI's audio has ``-inf``) are
  set to 0 and counted in the log. A pickle can run code when loaded: only load files you trust.
* ``label.csv`` alone: transcripts and scores for text-only use, with ``mode`` giving the split. MOSI's has
  ``id,text,label,mode``; MOSEI's ``video_id,clip_id,text,label,mode`` (ids become ``<video_id>_<clip_id>``).

Ids follow one convention in both sources: MMSA's ``<video>$_$<clip>`` becomes ``<video>_<clip>``.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmsenti.config import DataConfig
from mmsenti.data.base import DataError, DatasetBundle, Sample
from mmsenti.data.formats.common import canonical_split, find_file, finish, read_csv, require_root
from mmsenti.registry import DATASETS

log = logging.getLogger(__name__)

PICKLES = {"aligned": "aligned_50.pkl", "unaligned": "unaligned_50.pkl"}
SEQUENCE_MODALITIES = ("audio", "vision")


@dataclass
class MMSAConfig(DataConfig):
    name: str = "mosi"
    # auto: unaligned_50.pkl, else aligned_50.pkl, else label.csv (text only); none: label.csv even if pickles exist
    features: Literal["auto", "aligned", "unaligned", "none"] = "auto"
    feature_file: str | None = None  # an explicit pickle, relative to root (overrides `features`)
    text_features: bool = False  # also put the pickle's text feature sequence into features["text"]


@dataclass
class MOSEIConfig(MMSAConfig):
    name: str = "mosei"


def mmsa_id(raw: Any) -> str:
    return str(raw).replace("$_$", "_")


def _finite(arr: np.ndarray, what: str, name: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    n = int(bad.sum())
    if n:
        arr = arr.copy()
        arr[bad] = 0.0
        log.warning("%s: set %d non-finite value(s) of %s to 0", name, n, what)
    return arr


def read_label_csv(path: Path) -> dict[str, list[Sample]]:
    """``label.csv`` → samples per split, label = the sentiment score."""
    splits: dict[str, list[Sample]] = {}
    for lineno, row in read_csv(path, required=("text", "label", "mode")):
        where = f"{path}:{lineno}"
        if row.get("id"):
            sid = mmsa_id(row["id"])
        elif row.get("video_id") and row.get("clip_id"):
            sid = f"{row['video_id']}_{row['clip_id']}"
        else:
            raise DataError(f"{where}: no id (expected an id column or video_id and clip_id)")
        try:
            score = float(row["label"])
        except ValueError:
            raise DataError(f"{where}: label {row['label']!r} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{where}: label {row['label']!r} is not finite")
        extra = {k: row[k] for k in ("video_id", "clip_id") if row.get(k)}
        split = canonical_split(row["mode"], where)
        splits.setdefault(split, []).append(Sample(id=sid, label=score, text=row["text"].strip(), extra=extra))
    return splits


def read_mmsa_pickle(path: Path, text_features: bool, name: str) -> dict[str, list[Sample]]:
    """An MMSA feature pickle → samples per split with trimmed feature sequences."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - the documented MMSA format; the docs say to trust the file
    except (pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError) as e:
        raise DataError(f"{path}: not a readable MMSA pickle ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a dict of splits, got {type(data).__name__}")
    splits: dict[str, list[Sample]] = {}
    for key, part in data.items():
        where = f"{path} [{key!r}]"
        split = canonical_split(key, where)
        if not isinstance(part, dict) or "regression_labels" not in part:
            raise DataError(f"{where}: expected a dict with regression_labels, audio, vision, ...")
        labels = np.asarray(part["regression_labels"], dtype=np.float64).reshape(-1)
        n = len(labels)
        ids = [mmsa_id(i) for i in part["id"]] if "id" in part else [f"{split}-{i}" for i in range(n)]
        texts = list(part.get("raw_text", [None] * n))
        seqs: dict[str, np.ndarray] = {}
        lengths: dict[str, np.ndarray] = {}
        for mod in SEQUENCE_MODALITIES + (("text",) if text_features else ()):
            if mod not in part:
                raise DataError(f"{where}: no '{mod}' array")
            arr = _finite(part[mod], f"{split} {mod}", name)
            if arr.ndim != 3 or arr.shape[0] != n:
                raise DataError(f"{where}: '{mod}' has shape {arr.shape}, expected ({n}, T, D)")
            seqs[mod] = arr
            lens = part.get(f"{mod}_lengths")
            lengths[mod] = (np.full(n, arr.shape[1]) if lens is None
                            else np.clip(np.asarray(lens, dtype=np.int64).reshape(-1), 0, arr.shape[1]))
            if len(lengths[mod]) != n:
                raise DataError(f"{where}: '{mod}_lengths' has {len(lengths[mod])} entries for {n} samples")
        for name_, arr in (("id", ids), ("raw_text", texts)):
            if len(arr) != n:
                raise DataError(f"{where}: '{name_}' has {len(arr)} entries for {n} labels")
        samples = []
        for i in range(n):
            feats = {mod: seqs[mod][i, : int(lengths[mod][i])] for mod in seqs}
            text = None if texts[i] is None else str(texts[i]).strip()
            samples.append(Sample(id=ids[i], label=float(labels[i]), text=text, features=feats))
        empty = {m: int((lengths[m] == 0).sum()) for m in lengths if (lengths[m] == 0).any()}
        if empty:
            log.warning("%s: %s samples with empty sequences: %s", name, split,
                        ", ".join(f"{m} {k}" for m, k in empty.items()))
        splits[split] = samples
    return splits


def _find_pickle(root: Path, cfg: MMSAConfig) -> Path | None:
    if cfg.feature_file:
        p = root / cfg.feature_file
        if not p.is_file():
            raise DataError(f"data.feature_file: file not found: {p}")
        return p
    if cfg.features == "none":
        return None
    kinds = ["unaligned", "aligned"] if cfg.features == "auto" else [cfg.features]
    for kind in kinds:
        p = find_file(root, [PICKLES[kind], f"Processed/{PICKLES[kind]}"])
        if p is not None:
            return p
    if cfg.features != "auto":
        raise DataError(f"data.features={cfg.features}: no {PICKLES[cfg.features]} in {root} or {root / 'Processed'}")
    return None


def build_mmsa(cfg: MMSAConfig) -> DatasetBundle:
    root = require_root(cfg)
    pkl = _find_pickle(root, cfg)
    csv_path = find_file(root, ["label.csv"])
    if pkl is not None:
        splits = read_mmsa_pickle(pkl, cfg.text_features, cfg.name)
        sources = [pkl]
        if csv_path is not None and any(s.text is None for v in splits.values() for s in v):
            texts = {s.id: s.text for v in read_label_csv(csv_path).values() for s in v}
            for v in splits.values():
                for s in v:
                    if s.text is None:
                        s.text = texts.get(s.id)
            sources.append(csv_path)
        modalities: tuple[str, ...] = ("text", *SEQUENCE_MODALITIES)
    elif csv_path is not None:
        splits, sources, modalities = read_label_csv(csv_path), [csv_path], ("text",)
    else:
        raise DataError(f"{root}: no {cfg.name.upper()} data found (expected label.csv, aligned_50.pkl or "
                        f"unaligned_50.pkl, in the root or Processed/)")
    return finish(cfg.name, splits, "regression", None, modalities, sources)


DATASETS.register("mosi", config=MMSAConfig,
                  description="CMU-MOSI clips (score in [-3,3]): MMSA feature pickles or label.csv text")(build_mmsa)
DATASETS.register("mosei", config=MOSEIConfig,
                  description="CMU-MOSEI clips (score in [-3,3]): MMSA feature pickles or label.csv text")(build_mmsa)
