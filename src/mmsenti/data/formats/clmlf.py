"""CLMLF-style release files (MVSA, HFM as the CLMLF authors ship them): json split files and back-translations."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mmsenti.data.base import Sample
from mmsenti.data.formats.bundle import canonical_split, find_file
from mmsenti.data.formats.readers import read_json_list
from mmsenti.errors import DataError

log = logging.getLogger(__name__)


def read_clmlf_splits(root: Path, split_files: dict[str, Sequence[str]], num_labels: int, encoding: str = "utf-8"
                      ) -> tuple[dict[str, list[Sample]], list[Path]]:
    """CLMLF-style json splits (MVSA, HFM): each file a list of ``{"id", "text", "emotion_label"}``.

    ``split_files`` maps a split to the file names tried in order; a split with no file is left out.
    Returns the samples per canonical split and the files read.
    """
    splits: dict[str, list[Sample]] = {}
    sources = []
    for split, names in split_files.items():
        path = find_file(root, names)
        if path is None:
            continue
        sources.append(path)
        samples = []
        for i, row in enumerate(read_json_list(path, encoding)):
            try:
                samples.append(Sample(id=str(row["id"]), label=int(row["emotion_label"]), text=str(row["text"])))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}: item {i}: expected id, text and an integer emotion_label ({e})") from None
            if not 0 <= samples[-1].label < num_labels:
                raise DataError(f"{path}: item {i}: emotion_label must be in 0..{num_labels - 1}, "
                                f"got {samples[-1].label}")
        splits[canonical_split(split, str(path))] = samples
    return splits, sources


def attach_translations(splits: dict[str, list[Sample]], root: Path, name: str) -> Path:
    """``translation.json`` (CLMLF: ``[{"id", "text_translation"}]``, back-translated text used for augmentation)
    into ``extra["translation"]``; posts without one get None (counted in the log)."""
    path = root / "translation.json"
    if not path.is_file():
        raise DataError(f"data.use_translation: no translation.json in {root}")
    table = {}
    for i, row in enumerate(read_json_list(path)):
        if "id" not in row or "text_translation" not in row:
            raise DataError(f"{path}: item {i}: expected id and text_translation")
        table[str(row["id"])] = str(row["text_translation"])
    lacking = 0
    for samples in splits.values():
        for s in samples:
            s.extra["translation"] = table.get(s.id)
            lacking += s.extra["translation"] is None
    if lacking:
        log.warning("%s: %d post(s) have no back-translation in %s", name, lacking, path)
    return path
