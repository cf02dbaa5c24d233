"""From a release on disk to a checked :class:`~mmsenti.data.base.DatasetBundle`: the dataset's root, its split
names, and :func:`finish`, the checks every load ends with (texts a tokenizer cannot take, duplicate ids).

The checks that end a load with a :class:`~mmsenti.data.base.DataError` (duplicate ids here, missing images in
:mod:`~mmsenti.data.formats.images`, suspect labels in :mod:`~mmsenti.data.formats.labels`) are skipped when a
loader is called with ``lenient=True``: the data doctor does so, then sees the whole dataset and reports every
problem itself instead of stopping at the first. Malformed files still raise.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from mmsenti.config import DataConfig
from mmsenti.data.base import SPLITS, DatasetBundle, Sample, Task, text_problem
from mmsenti.errors import DataError

log = logging.getLogger(__name__)

# Names the releases use for the three splits; everything is keyed "train"/"dev"/"test" after loading.
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "dev": "dev", "valid": "dev", "val": "dev", "validation": "dev",
    "test": "test", "testing": "test",
}


def require_root(cfg: DataConfig) -> Path:
    """The dataset directory (or file, for user data) named by ``data.root``; a clear error when unset or absent."""
    if not cfg.root:
        raise DataError(f"dataset '{cfg.name}': data.root is not set (give the dataset directory: --root DIR "
                        f"or --set data.root=DIR)")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"dataset '{cfg.name}': data.root does not exist: {root}")
    return root


def canonical_split(name: str, where: str) -> str:
    """``valid``/``val``/... → ``dev``; anything unknown is an error naming ``where`` (file and line)."""
    key = str(name).strip().lower()
    if key not in SPLIT_ALIASES:
        raise DataError(f"{where}: unknown split {name!r} (use one of: train, dev/valid/val, test)")
    return SPLIT_ALIASES[key]


def find_file(root: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (relative to ``root``) that exists."""
    for n in names:
        p = root / n
        if p.exists():
            return p
    return None


def duplicate_ids(samples: Iterable[Sample]) -> list[str]:
    counts = Counter(s.id for s in samples)
    return sorted(i for i, n in counts.items() if n > 1)


def finish(name: str, splits: dict[str, list[Sample]], task: Task, label_names: list[str] | None,
           modalities: tuple[str, ...], sources: Sequence[Path] = (),
           text_fn: Callable[[str], str] | None = None, *, lenient: bool = False) -> DatasetBundle:
    """Order the splits, apply the text normaliser, refuse texts a tokenizer cannot take (:func:`text_problem`) and
    duplicate ids (kept when ``lenient``: the data doctor reports them), and log the split sizes.

    Splits a release does not have are left out (``bundle.split(name)`` then names what exists), never filled
    with an empty list that would train or score on nothing.
    """
    ordered = {k: splits[k] for k in SPLITS if k in splits and splits[k]}
    if not ordered:
        raise DataError(f"dataset '{name}': no samples found")
    for split, samples in ordered.items():
        for s in samples:
            if s.text and text_fn is not None:
                s.text = text_fn(s.text)
            # The file readers name the line; this catches texts from anywhere else (feature files, odd encodings).
            if s.text and (problem := text_problem(s.text)) is not None:
                raise DataError(f"dataset '{name}': {split} post {s.id!r}: the text {problem}")
    if not lenient:
        dups = duplicate_ids(s for samples in ordered.values() for s in samples)
        if dups:
            raise DataError(f"dataset '{name}': {len(dups)} duplicate id(s) (first: {', '.join(dups[:5])}); "
                            f"ids must be unique across all splits (run `mmsenti data check {name}`)")
    log.info("%s: %s", name, ", ".join(f"{k} {len(v)}" for k, v in ordered.items()))
    return DatasetBundle(name=name, splits=ordered, task=task, label_names=label_names, modalities=modalities,
                         sources=[Path(p) for p in sources])
