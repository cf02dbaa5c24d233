"""A user's own data, no code needed: JSON-lines (``jsonl``) or CSV/TSV (``csv``) files.

Each record has ``text``, ``image`` (a path relative to the file holding it, or absolute), ``label``, and
optionally ``id``, ``split`` (train, dev/valid/val, test) and ``tags`` (words or ids describing the image, read by
the ``tags`` image encoder: a list of strings in JSON lines, one ``|``-separated cell in CSV/TSV); the field names
are configurable. ``data.root`` is either

* one file, whose ``split`` field sends each record to a split (records without one go to train), or
* a directory holding ``train``, ``dev`` (or ``valid``/``val``) and ``test`` files (``train.jsonl``, ...).

Labels are class names or indices. Their order is ``label_names`` when given (a record with another label is an
error), else the sorted distinct names found (or 0..K-1 for integer labels). With ``task: regression`` labels
are numbers. Splits the files do not provide can be carved from train (``dev_fraction``, ``test_fraction``,
stratified, seeded). Every malformed record is an error naming the file and line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmsenti.config import DataConfig
from mmsenti.data.base import DataError, DatasetBundle, Sample, parse_tags
from mmsenti.data.formats.bundle import SPLIT_ALIASES, canonical_split, finish, require_root
from mmsenti.data.formats.images import apply_image_policy
from mmsenti.data.formats.labels import check_inferred_labels, label_index
from mmsenti.data.formats.readers import MAX_RECORD_LINES, read_csv, read_jsonl
from mmsenti.data.formats.text import normalize_tweet
from mmsenti.data.splits import carve_split
from mmsenti.registry import DATASETS

log = logging.getLogger(__name__)


@dataclass
class UserDataConfig(DataConfig):
    name: str = "jsonl"
    task: Literal["classification", "regression"] = "classification"
    label_names: list[str] | None = None  # fixes the class order; None = sorted names found in the data
    text_field: str = "text"
    image_field: str = "image"
    label_field: str = "label"
    id_field: str = "id"  # records without an id get "<file stem>:<line>"
    split_field: str = "split"
    # The post's tags (model.image_encoder.name=tags): JSON lines a list of strings, CSV/TSV one cell "a|b|c"
    tags_field: str = "tags"
    dev_fraction: float = 0.0  # carve a dev split from train when the files have none (0 = don't)
    test_fraction: float = 0.0  # likewise for test
    seed: int = 0  # seed of the carving
    normalize_text: bool = False  # apply the tweet normalisation (mentions, URLs, hashtags, emoji)
    # CSV: a record spanning more lines is an error (an unterminated quote swallows the rows after it); 0 = no limit
    # (the other checks for an unterminated quote still apply)
    max_record_lines: int = MAX_RECORD_LINES


@dataclass
class CsvDataConfig(UserDataConfig):
    name: str = "csv"
    delimiter: str = ","  # files ending in .tsv are always read with tabs


@dataclass
class Record:
    path: Path
    line: int
    fields: dict[str, Any]
    split: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def tags(self, name: str) -> list[str] | None:
        """The record's tags (None without them); a malformed value is an error naming the file, line and field."""
        try:
            return parse_tags(self.fields.get(name), cell=self.path.suffix.lower() in (".csv", ".tsv"))
        except DataError as e:
            raise DataError(f"{self.where}: {name}: {e}") from None


def _data_files(root: Path, exts: tuple[str, ...]) -> list[tuple[Path, str | None]]:
    """``(file, split or None)``: the root itself, or the split files of a directory."""
    if root.is_file():
        return [(root, None)]
    files = []
    for stem, split in SPLIT_ALIASES.items():
        for ext in exts:
            p = root / f"{stem}{ext}"
            if p.is_file():
                files.append((p, split))
    if not files:
        raise DataError(f"{root}: no data files (expected train{exts[0]}, dev{exts[0]}, test{exts[0]}, or give "
                        f"data.root as a single file)")
    splits = [s for _, s in files]
    dup = sorted({s for s in splits if splits.count(s) > 1})
    if dup:
        raise DataError(f"{root}: several files for split {dup[0]}: "
                        f"{', '.join(p.name for p, s in files if s == dup[0])}")
    return files


def read_records(path: Path, *, delimiter: str = ",", encoding: str = "utf-8",
                 max_record_lines: int = MAX_RECORD_LINES) -> list[tuple[int, dict[str, Any]]]:
    """``(line, record)`` pairs of a ``.jsonl`` or ``.csv``/``.tsv`` file."""
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return list(read_jsonl(path, encoding))
    return list(read_csv(path, delimiter="\t" if path.suffix.lower() == ".tsv" else delimiter, encoding=encoding,
                         max_record_lines=max_record_lines))


def _records(cfg: UserDataConfig, root: Path, exts: tuple[str, ...]) -> list[Record]:
    records = []
    for path, file_split in _data_files(root, exts):
        for line, fields in read_records(path, delimiter=getattr(cfg, "delimiter", ","), encoding=cfg.encoding,
                                         max_record_lines=cfg.max_record_lines):
            value = fields.get(cfg.split_field)
            split = file_split or "train"
            if value not in (None, ""):
                split = canonical_split(value, f"{path}:{line}")
                if file_split and split != file_split:
                    raise DataError(f"{path}:{line}: {cfg.split_field} is {value!r} in the {file_split} file")
            records.append(Record(path, line, fields, split))
    return records


def _label_names(cfg: UserDataConfig, records: list[Record]) -> list[str]:
    if cfg.label_names:
        return list(cfg.label_names)
    indices, names = set(), set()
    for r in records:
        v = r.fields[cfg.label_field]
        if isinstance(v, int) and not isinstance(v, bool):
            indices.add(v)
        elif isinstance(v, str) and v.strip().isdigit():
            indices.add(int(v))
        elif isinstance(v, str):
            names.add(v.strip())
        else:
            raise DataError(f"{r.where}: label {v!r} is neither a class name nor an index")
    if indices and names:
        raise DataError(f"{records[0].path}: labels mix indices and names; give data.label_names")
    out = [str(i) for i in range(max(indices) + 1)] if indices else sorted(names)
    log.info("%s: label order %s (set data.label_names to fix another)", cfg.name, out)
    return out


def _label(cfg: UserDataConfig, r: Record, names: list[str] | None) -> int | float:
    value = r.fields[cfg.label_field]
    if names is not None:
        return label_index(value, names, r.where)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{r.where}: label {value!r} is not a number (task: regression)") from None
    return score


def build_user(cfg: UserDataConfig, exts: tuple[str, ...], *, lenient: bool = False) -> DatasetBundle:
    root = require_root(cfg)
    records = _records(cfg, root, exts)
    if not records:
        raise DataError(f"{root}: no records")
    for r in records:
        if r.fields.get(cfg.label_field) in (None, ""):
            raise DataError(f"{r.where}: no {cfg.label_field!r} value")
    names = _label_names(cfg, records) if cfg.task == "classification" else None
    has_text = any(cfg.text_field in r.fields for r in records)
    has_image = any(r.fields.get(cfg.image_field) not in (None, "") for r in records)
    has_tags = any(r.fields.get(cfg.tags_field) not in (None, "") for r in records)
    if not (has_text or has_image or has_tags):
        raise DataError(f"{records[0].path}: records have none of {cfg.text_field!r}, {cfg.image_field!r}, "
                        f"{cfg.tags_field!r}")
    splits: dict[str, list[Sample]] = {}
    for r in records:
        text = r.fields.get(cfg.text_field)
        if text is not None and not isinstance(text, str):
            raise DataError(f"{r.where}: {cfg.text_field} must be a string, got {type(text).__name__}")
        image = r.fields.get(cfg.image_field)
        if image not in (None, ""):
            if not isinstance(image, str):
                raise DataError(f"{r.where}: {cfg.image_field} must be a path, got {type(image).__name__}")
            p = Path(image).expanduser()
            image = p if p.is_absolute() else r.path.parent / p
        else:
            image = None
        sid = r.fields.get(cfg.id_field)
        sid = f"{r.path.stem}:{r.line}" if sid in (None, "") else str(sid)
        extra = {k: v for k, v in r.fields.items() if k not in (cfg.text_field, cfg.image_field, cfg.label_field,
                                                                cfg.id_field, cfg.split_field, cfg.tags_field)}
        splits.setdefault(r.split, []).append(Sample(id=sid, label=_label(cfg, r, names),
                                                     text=(text or "") if has_text else None, image=image,
                                                     tags=r.tags(cfg.tags_field), extra=extra))
    stratify = cfg.task == "classification"
    for split, fraction in (("test", cfg.test_fraction), ("dev", cfg.dev_fraction)):
        if fraction and split not in splits and "train" in splits:
            splits["train"], splits[split] = carve_split(splits["train"], fraction, cfg.seed, stratify)
            log.info("%s: carved %d %s samples from train (fraction %g, seed %d)", cfg.name, len(splits[split]),
                     split, fraction, cfg.seed)
        elif fraction and split in splits:
            log.info("%s: the files have a %s split; %s_fraction is not used", cfg.name, split, split)
    modalities = tuple(m for m, present in (("text", has_text), ("image", has_image), ("tags", has_tags)) if present)
    if has_image:
        splits = apply_image_policy(splits, cfg, root, lenient=lenient)
    bundle = finish(cfg.name, splits, cfg.task, names, modalities, sorted({r.path for r in records}),
                    normalize_tweet if cfg.normalize_text else None, lenient=lenient)
    if names is not None and not cfg.label_names:
        bundle.inferred_labels = True
        check_inferred_labels(cfg.name, bundle.splits, names, root, lenient=lenient)
    return bundle


@DATASETS.register("jsonl", config=UserDataConfig,
                   description="your own JSON-lines file(s): text, image path, label, optional id/split/tags")
def build_jsonl(cfg: UserDataConfig, *, lenient: bool = False) -> DatasetBundle:
    return build_user(cfg, (".jsonl",), lenient=lenient)


@DATASETS.register("csv", config=CsvDataConfig,
                   description="your own CSV/TSV file(s): text, image path, label, optional id/split/tags")
def build_csv(cfg: CsvDataConfig, *, lenient: bool = False) -> DatasetBundle:
    return build_user(cfg, (".csv", ".tsv"), lenient=lenient)
