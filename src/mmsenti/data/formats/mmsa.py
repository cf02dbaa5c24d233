"""CMU-MOSI and CMU-MOSEI in the MMSA release: sentiment scores in [-3, 3] (regression).

Two sources are read:

* the feature pickles most code uses, ``aligned_50.pkl`` / ``unaligned_50.pkl`` (in the root or
  ``Processed/``): a dict ``{"train", "valid", "test"}`` of dicts holding ``raw_text``, ``audio`` and ``vision``
  (N, T, D) sequences with ``audio_lengths`` / ``vision_lengths``, ``text`` (GloVe or BERT features),
  ``regression_labels`` and ``id``. Sequences are cut to their lengths; ``features`` holds ``audio`` and
  ``vision`` (and ``text`` with ``text_features: true``). Non-finite values (MOSI's audio has ``-inf``) are
  set to 0 and counted in the log.

  A pickle can run code when it is loaded, so mmsenti reads one only with ``data.trust_pickle: true``. The safe
  way is to convert it once, ``mmsenti data convert mosi --root DIR``: :func:`convert_pickle` reads it with an
  unpickler that builds numpy arrays, strings and containers only (anything else is refused, nothing is called)
  and writes the same arrays beside it as ``<name>.npz`` (read with ``allow_pickle=False``), which is preferred
  to the pickle from then on.
* ``label.csv`` alone: transcripts and scores for text-only use, with ``mode`` giving the split. MOSI's has
  ``id,text,label,mode``; MOSEI's ``video_id,clip_id,text,label,mode`` (ids become ``<video_id>_<clip_id>``).

Ids follow one convention in both sources: MMSA's ``<video>$_$<clip>`` becomes ``<video>_<clip>``.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmsenti.config import DataConfig
from mmsenti.data.base import DataError, DatasetBundle, Sample
from mmsenti.data.formats.bundle import canonical_split, find_file, finish, require_root
from mmsenti.data.formats.readers import read_csv
from mmsenti.registry import DATASETS
from mmsenti.utils import write_atomic

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
    # Read feature *pickles* (they can run code when loaded). Without it, convert them once with
    # `mmsenti data convert` into .npz files, which need no trust.
    trust_pickle: bool = False


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


def read_label_csv(path: Path, encoding: str = "utf-8") -> dict[str, list[Sample]]:
    """``label.csv`` → samples per split, label = the sentiment score."""
    splits: dict[str, list[Sample]] = {}
    for lineno, row in read_csv(path, required=("text", "label", "mode"), encoding=encoding):
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


# What an MMSA feature pickle is made of: numpy arrays (and scalars, dtypes) in dicts, lists and strings. The
# conversion's unpickler builds these and nothing else.
_ARRAY_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, containers and strings only: any other class or function a file names is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ARRAY_GLOBALS or (module in ("numpy.dtypes", "numpy._core.dtypes")
                                                 and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which is not part of an MMSA feature file")


def load_feature_npz(path: Path) -> dict[str, dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            data: dict[str, dict[str, np.ndarray]] = {}
            for key in z.files:
                split, _, field = key.partition(".")
                data.setdefault(split, {})[field] = z[key]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz feature file ({e})") from None
    return data


def _load_pickle(path: Path, trust: bool) -> Any:
    if not trust:
        npz = path.with_suffix(".npz")
        raise DataError(
            f"{path} is a Python pickle, and loading a pickle can run code; mmsenti reads data pickles only when "
            f"told to trust them: convert it once to a safe file with `mmsenti data convert <dataset> --root DIR` "
            f"(writes {npz.name} beside it, used from then on), or set data.trust_pickle=true if you trust its source")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)  # noqa: S301 - only with data.trust_pickle: the user vouched for this file
    except (pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a readable MMSA pickle ({e.__class__.__name__}: {e})") from None


def convert_pickle(path: str | Path) -> Path:
    """Convert an MMSA feature pickle into ``<name>.npz`` beside it, without running code from it.

    The pickle is read by an unpickler that builds numpy arrays, containers and strings only, so a crafted file is
    refused (:class:`DataError` naming what it references) instead of executed. Returns the ``.npz`` path.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: refused to convert: {e} (nothing in it was run)") from None
    except (EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable MMSA pickle ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"{path}: expected a dict of splits, each a dict of arrays")
    arrays: dict[str, np.ndarray] = {}
    for split, part in data.items():
        for field, value in part.items():
            arr = np.asarray(value)
            if arr.dtype == object:  # ids / raw texts kept as Python strings: store them as fixed-width unicode
                if not all(isinstance(x, str) for x in arr.reshape(-1)):
                    raise DataError(f"{path} [{split!r}][{field!r}]: holds objects other than numbers and strings")
                arr = arr.astype(str)
            if "." in str(split) or "." in str(field):
                raise DataError(f"{path}: key {split!r}/{field!r} contains a dot")
            arrays[f"{split}.{field}"] = arr
    out = path.with_suffix(".npz")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(out, buf.getvalue())  # a killed conversion leaves no half file that would be preferred to the pickle
    log.info("converted %s → %s (%d arrays)", path, out, len(arrays))
    return out


def read_mmsa_features(path: Path, text_features: bool, name: str, trust_pickle: bool = False
                       ) -> dict[str, list[Sample]]:
    """An MMSA feature file (a converted ``.npz``, or a pickle with ``trust_pickle``) → samples per split."""
    data = load_feature_npz(path) if path.suffix == ".npz" else _load_pickle(path, trust_pickle)
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


def _find_features(root: Path, cfg: MMSAConfig) -> Path | None:
    """The feature file to read: ``data.feature_file``, else the setting's converted ``.npz`` or its pickle."""
    if cfg.feature_file:
        p = root / cfg.feature_file
        if not p.is_file():
            raise DataError(f"data.feature_file: file not found: {p}")
        return p
    if cfg.features == "none":
        return None
    kinds = ["unaligned", "aligned"] if cfg.features == "auto" else [cfg.features]
    for kind in kinds:
        stem = Path(PICKLES[kind]).stem
        p = find_file(root, [f"{stem}.npz", PICKLES[kind], f"Processed/{stem}.npz", f"Processed/{PICKLES[kind]}"])
        if p is not None:
            return p
    if cfg.features != "auto":
        raise DataError(f"data.features={cfg.features}: no {PICKLES[cfg.features]} in {root} or {root / 'Processed'}")
    return None


def build_mmsa(cfg: MMSAConfig, *, lenient: bool = False) -> DatasetBundle:
    root = require_root(cfg)
    pkl = _find_features(root, cfg)
    csv_path = find_file(root, ["label.csv"])
    if pkl is not None:
        splits = read_mmsa_features(pkl, cfg.text_features, cfg.name, cfg.trust_pickle)
        sources = [pkl]
        if csv_path is not None and any(s.text is None for v in splits.values() for s in v):
            texts = {s.id: s.text for v in read_label_csv(csv_path, cfg.encoding).values() for s in v}
            for v in splits.values():
                for s in v:
                    if s.text is None:
                        s.text = texts.get(s.id)
            sources.append(csv_path)
        modalities: tuple[str, ...] = ("text", *SEQUENCE_MODALITIES)
    elif csv_path is not None:
        splits, sources, modalities = read_label_csv(csv_path, cfg.encoding), [csv_path], ("text",)
    else:
        raise DataError(f"{root}: no {cfg.name.upper()} data found (expected label.csv, aligned_50.pkl or "
                        f"unaligned_50.pkl, in the root or Processed/)")
    return finish(cfg.name, splits, "regression", None, modalities, sources, lenient=lenient)


def convert_dataset(cfg: MMSAConfig) -> list[Path]:
    """``mmsenti data convert``: convert the dataset's feature pickles (``data.feature_file``, or every
    ``aligned_50.pkl`` / ``unaligned_50.pkl`` in the root and ``Processed/``) to ``.npz``; returns what it wrote."""
    root = require_root(cfg)
    if cfg.feature_file:
        pickles = [root / cfg.feature_file]
    else:
        pickles = [p for name in PICKLES.values() for p in (root / name, root / "Processed" / name) if p.is_file()]
    pickles = [p for p in pickles if p.suffix != ".npz"]
    if not pickles:
        raise DataError(f"{root}: no MMSA feature pickle to convert ({', '.join(PICKLES.values())}, in the root "
                        f"or Processed/)")
    return [convert_pickle(p) for p in pickles]


DATASETS.register("mosi", config=MMSAConfig,
                  description="CMU-MOSI clips (score in [-3,3]): MMSA feature pickles or label.csv text")(build_mmsa)
DATASETS.register("mosei", config=MOSEIConfig,
                  description="CMU-MOSEI clips (score in [-3,3]): MMSA feature pickles or label.csv text")(build_mmsa)
