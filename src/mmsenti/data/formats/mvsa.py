"""MVSA-Single and MVSA-Multiple (Niu et al. 2016): Twitter image-text posts, 3 sentiment classes.

Two layouts are read:

* ``clmlf``: ``train.json``/``dev.json``/``test.json`` (lists of ``{"id", "text", "emotion_label"}``, labels
  0 positive, 1 neutral, 2 negative), the split of CLMLF and INFIG, plus an optional image folder holding
  ``<id>.jpg`` (``dataset_image/``, ``images/`` or ``data/``).
* ``raw``: the original release, ``data/<id>.txt`` + ``data/<id>.jpg`` and ``labelResultAll.txt`` holding a
  ``text,image`` label pair per annotator (one for Single, three for Multiple), merged with the rule of
  MultiSentiNet and CLMLF (:func:`merge_labels`). Splits come from id lists when the directory has them
  (``splits/{train,dev,test}.txt``, one id per line, or the CLMLF json files), else a seeded stratified 8:1:1.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmsenti.config import DataConfig
from mmsenti.data.base import DataError, DatasetBundle, Sample
from mmsenti.data.formats.bundle import find_file, finish, require_root
from mmsenti.data.formats.clmlf import attach_translations, read_clmlf_splits
from mmsenti.data.formats.images import attach_images
from mmsenti.data.formats.readers import read_json_list, read_text_file, text_lines
from mmsenti.data.formats.text import normalize_tweet
from mmsenti.data.splits import random_splits, split_by_id_lists
from mmsenti.registry import DATASETS

log = logging.getLogger(__name__)

LABELS = ["positive", "neutral", "negative"]  # the CLMLF json ids 0, 1, 2
IMAGE_DIRS = ("dataset_image", "images", "image", "data")
_JSON_SPLITS = {"train": ("train.json",), "dev": ("dev.json", "valid.json", "val.json"), "test": ("test.json",)}


@dataclass
class MVSAConfig(DataConfig):
    name: str = "mvsa-single"
    format: Literal["auto", "clmlf", "raw"] = "auto"  # auto: raw when labelResultAll.txt exists, else clmlf
    normalize_text: bool = False  # CLMLF feeds the raw tweet to BERT; true applies normalize_tweet
    image_dir: str | None = None  # relative to root; None = first of dataset_image/, images/, image/, data/
    split_dir: str | None = None  # raw layout: folder with train/dev/test id lists (default: splits/ or root)
    seed: int = 0  # raw layout without split lists: seed of the stratified 8:1:1 split
    use_translation: bool = False  # translation.json (CLMLF's back-translations) into extra["translation"]


@dataclass
class MVSAMultipleConfig(MVSAConfig):
    name: str = "mvsa-multiple"


# ------------------------------------------------------------------------------------------------ merge rule
def majority(labels: list[str]) -> str | None:
    """One annotator's label as is; for several, the label more than half of them gave, else None."""
    label, n = Counter(labels).most_common(1)[0]
    return label if n * 2 > len(labels) else None


def merge_pair(text: str, image: str) -> str | None:
    """Text + image label → post label: equal → it; one neutral → the other; positive + negative → None."""
    if text == image:
        return text
    if text == "neutral":
        return image
    if image == "neutral":
        return text
    return None  # positive vs negative: contradictory, dropped


def merge_labels(pairs: list[tuple[str, str]]) -> tuple[str | None, str]:
    """The post label from per-annotator ``(text, image)`` labels, and why a post is dropped.

    MVSA-Multiple first takes a majority vote (2 of 3) per modality; a modality without one drops the post.
    Returns ``(label, "")`` or ``(None, reason)``.
    """
    text = majority([t for t, _ in pairs])
    image = majority([i for _, i in pairs])
    if text is None or image is None:
        return None, "no majority"
    label = merge_pair(text, image)
    return (label, "") if label else (None, "positive+negative")


def read_label_file(path: Path, encoding: str = "utf-8") -> dict[str, tuple[str | None, str]]:
    """``labelResultAll.txt`` → ``{id: (merged label or None, drop reason)}``."""
    out: dict[str, tuple[str | None, str]] = {}
    with contextlib.closing(text_lines(path, encoding)) as lines:
        for lineno, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or (lineno == 1 and not fields[0].isdigit()):  # header: "ID text,image ..."
                continue
            pairs = []
            for cell in fields[1:]:
                parts = [p.strip().lower() for p in cell.split(",")]
                if len(parts) != 2 or any(p not in LABELS for p in parts):
                    raise DataError(f"{path}:{lineno}: expected 'text,image' labels (positive/neutral/negative), "
                                    f"got {cell!r}")
                pairs.append((parts[0], parts[1]))
            if not pairs:
                raise DataError(f"{path}:{lineno}: no labels for post {fields[0]}")
            if fields[0] in out:
                raise DataError(f"{path}:{lineno}: post {fields[0]} is listed twice")
            out[fields[0]] = merge_labels(pairs)
    return out


# ------------------------------------------------------------------------------------------------ layouts
def _read_split_lists(root: Path, split_dir: str | None) -> dict[str, list[str]] | None:
    folder = root / split_dir if split_dir else (root / "splits" if (root / "splits").is_dir() else root)
    if split_dir and not folder.is_dir():
        raise DataError(f"data.split_dir: directory not found: {folder}")
    lists: dict[str, list[str]] = {}
    for split, json_names in _JSON_SPLITS.items():
        stem = json_names[0][:-5]
        txt = find_file(folder, [f"{n[:-5]}.txt" for n in json_names] + [f"{stem}_ids.txt"])
        js = find_file(folder, json_names)
        if txt is not None:
            lists[split] = [ln.strip() for ln in txt.read_text().splitlines() if ln.strip()]
        elif js is not None:
            lists[split] = [str(x["id"]) for x in read_json_list(js)]
    if not lists:
        if split_dir:
            raise DataError(f"data.split_dir: no train/dev/test id lists in {folder}")
        return None
    return lists


def _load_raw(cfg: MVSAConfig, root: Path) -> tuple[dict[str, list[Sample]], list[Path]]:
    label_file = root / "labelResultAll.txt"
    data = root / "data"
    if not data.is_dir():
        raise DataError(f"{root}: the original MVSA layout needs a data/ folder with <id>.txt and <id>.jpg")
    merged = read_label_file(label_file, cfg.encoding)
    dropped = Counter(reason for label, reason in merged.values() if label is None)
    if dropped:
        log.info("%s: merge rule dropped %d of %d posts (%s)", cfg.name, sum(dropped.values()), len(merged),
                 ", ".join(f"{r}: {n}" for r, n in sorted(dropped.items())))
    samples = []
    missing_text = []
    for pid, (label, _) in sorted(merged.items(), key=lambda kv: (len(kv[0]), kv[0])):
        if label is None:
            continue
        txt = data / f"{pid}.txt"
        if not txt.is_file():
            missing_text.append(pid)
            continue
        samples.append(Sample(id=pid, label=LABELS.index(label), text=read_text_file(txt, cfg.encoding).strip()))
    if missing_text:
        raise DataError(f"{data}: {len(missing_text)} labelled post(s) have no text file (first: "
                        f"{', '.join(missing_text[:5])})")
    lists = _read_split_lists(root, cfg.split_dir)
    if lists is None:
        log.warning("%s: no split id lists found in %s; using a seeded stratified 8:1:1 split (seed %d), which is "
                    "not the CLMLF split", cfg.name, root, cfg.seed)
        splits = random_splits(samples, cfg.seed)
    else:
        splits = split_by_id_lists(samples, lists, cfg.name)
    return splits, [label_file]


def _load_clmlf(cfg: MVSAConfig, root: Path) -> tuple[dict[str, list[Sample]], list[Path]]:
    splits, sources = read_clmlf_splits(root, _JSON_SPLITS, len(LABELS), cfg.encoding)
    if not splits:
        raise DataError(f"{root}: no MVSA data found (expected train.json/dev.json/test.json, or the original "
                        f"release with labelResultAll.txt and data/)")
    return splits, sources


def build_mvsa(cfg: MVSAConfig, *, lenient: bool = False) -> DatasetBundle:
    root = require_root(cfg)
    fmt = cfg.format
    if fmt == "auto":
        fmt = "raw" if (root / "labelResultAll.txt").is_file() else "clmlf"
    if fmt == "raw":
        splits, sources = _load_raw(cfg, root)
    else:
        splits, sources = _load_clmlf(cfg, root)
    if cfg.use_translation:  # keyed by post id: works for both layouts
        sources.append(attach_translations(splits, root, cfg.name))
    modalities = attach_images(splits, root, cfg.image_dir, ("data",) if fmt == "raw" else IMAGE_DIRS,
                               cfg, lenient=lenient)
    return finish(cfg.name, splits, "classification", list(LABELS), modalities, sources,
                  normalize_tweet if cfg.normalize_text else None, lenient=lenient)


DATASETS.register("mvsa-single", config=MVSAConfig,
                  description="MVSA-Single tweets (image+text, 3 classes): CLMLF json or original release")(build_mvsa)
DATASETS.register("mvsa-multiple", config=MVSAMultipleConfig,
                  description="MVSA-Multiple tweets (3 annotators merged): CLMLF json or original release")(build_mvsa)
