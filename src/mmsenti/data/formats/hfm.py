"""HFM, Twitter multimodal sarcasm detection (Cai et al. 2019): 2 classes, not-sarcastic (0) and sarcastic (1).

Two layouts are read:

* ``clmlf``: ``train.json``/``valid.json``/``test.json`` (lists of ``{"id", "text", "emotion_label"}``).
* ``raw``: the original release, ``train.txt``/``valid2.txt``/``test2.txt`` (in the root or ``raw/``), one
  Python list literal per line: ``['id', 'text', label]`` for train, ``['id', 'text', hashtag_label,
  human_label]`` for valid2/test2. The last element is the label. The standard training set leaves out posts
  whose whitespace tokens include a word that gives sarcasm away (:data:`FILTER_WORDS`); that leaves exactly the
  19,816 posts of ``train.json``. Valid and test are used unfiltered.

Images are ``<id>.jpg`` in ``dataset_image/`` (the release's name) or ``images/``. ``image_attributes.txt``
(five words per image, predicted from the image by Cai et al.) become the posts' tags (``Sample.tags``, read by
the ``tags`` image encoder) with ``use_attributes: true``.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmsenti.config import DataConfig
from mmsenti.data.base import DataError, DatasetBundle, Sample
from mmsenti.data.formats.bundle import find_file, finish, require_root
from mmsenti.data.formats.clmlf import attach_translations, read_clmlf_splits
from mmsenti.data.formats.images import attach_images
from mmsenti.data.formats.readers import field_problem, text_lines
from mmsenti.data.formats.text import normalize_tweet
from mmsenti.registry import DATASETS

log = logging.getLogger(__name__)

LABELS = ["not-sarcastic", "sarcastic"]
FILTER_WORDS = frozenset(
    {"sarcasm", "sarcastic", "reposting", "<url>", "joke", "jokes", "humour", "humor", "irony", "ironic", "exgag"}
)
IMAGE_DIRS = ("dataset_image", "images", "image")
_JSON = {"train": ("train.json",), "dev": ("valid.json", "dev.json", "val.json"), "test": ("test.json",)}
_RAW = {"train": ("train.txt",), "dev": ("valid2.txt", "valid.txt"), "test": ("test2.txt", "test.txt")}


@dataclass
class HFMConfig(DataConfig):
    name: str = "hfm"
    format: Literal["auto", "clmlf", "raw"] = "auto"  # auto: clmlf when train.json exists, else raw
    normalize_text: bool = False  # HFM text is already normalised (<user>, <url>, # tag); true names dingbats
    image_dir: str | None = None  # relative to root; None = dataset_image/, images/ or image/ when present
    filter_train: bool = True  # raw layout: the standard filter of giveaway words (see FILTER_WORDS)
    use_attributes: bool = False  # the image attribute words as the posts' tags (Sample.tags; the tags encoder)
    attributes_file: str | None = None  # default: image_attributes.txt in the root or raw/
    use_translation: bool = False  # translation.json (CLMLF's back-translations) into extra["translation"]


def parse_literal_line(line: str, path: Path, lineno: int) -> list[Any]:
    """One line of the raw release: a Python list literal (read safely, never executed)."""
    try:
        value = ast.literal_eval(line.strip())
    except (ValueError, SyntaxError) as e:
        raise DataError(f"{path}:{lineno}: not a Python list literal ({e.__class__.__name__})") from None
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{path}:{lineno}: expected a list ['id', ...], got {type(value).__name__}")
    if (problem := field_problem(dict(enumerate(value)))) is not None:  # a '\ud800' escape is a legal literal
        raise DataError(f"{path}:{lineno}: {problem}")
    return value


def is_giveaway(text: str) -> bool:
    """True when the post's whitespace tokens include a word of :data:`FILTER_WORDS`."""
    return not FILTER_WORDS.isdisjoint(text.split())


def read_raw_split(path: Path, filter_words: bool, encoding: str = "utf-8") -> tuple[list[Sample], int]:
    """``(samples, number filtered out)`` from one raw file; the last element of each line is the label."""
    samples, dropped = [], 0
    for lineno, line in enumerate(text_lines(path, encoding), 1):
        if not line.strip():
            continue
        row = parse_literal_line(line, path, lineno)
        if len(row) < 3 or not isinstance(row[1], str) or row[-1] not in (0, 1):
            raise DataError(f"{path}:{lineno}: expected ['id', 'text', ..., 0 or 1]")
        if filter_words and is_giveaway(row[1]):
            dropped += 1
            continue
        samples.append(Sample(id=str(row[0]), label=int(row[-1]), text=row[1]))
    return samples, dropped


def read_attributes(path: Path, encoding: str = "utf-8") -> dict[str, list[str]]:
    out = {}
    for lineno, line in enumerate(text_lines(path, encoding), 1):
        if line.strip():
            row = parse_literal_line(line, path, lineno)
            out[str(row[0])] = [str(w) for w in row[1:]]
    return out


def _raw_dir(root: Path) -> Path | None:
    for d in (root, root / "raw"):
        if (d / "train.txt").is_file() or (d / "test2.txt").is_file():
            return d
    return None


def _load_raw(root: Path, filter_train: bool, name: str, encoding: str) -> tuple[dict[str, list[Sample]], list[Path]]:
    raw = _raw_dir(root)
    if raw is None:
        raise DataError(f"{root}: no HFM data found (expected train.json/valid.json/test.json, or the original "
                        f"release train.txt/valid2.txt/test2.txt in the root or raw/)")
    splits, sources = {}, []
    for split, names in _RAW.items():
        path = find_file(raw, names)
        if path is None:
            continue
        samples, dropped = read_raw_split(path, filter_train and split == "train", encoding)
        if dropped:
            log.info("%s: the standard filter left out %d of %d training posts", name, dropped,
                     dropped + len(samples))
        splits[split] = samples
        sources.append(path)
    return splits, sources


@DATASETS.register("hfm", config=HFMConfig,
                   description="HFM Twitter sarcasm (image+text, 2 classes): CLMLF json or original release")
def build_hfm(cfg: HFMConfig, *, lenient: bool = False) -> DatasetBundle:
    root = require_root(cfg)
    fmt = cfg.format
    if fmt == "auto":
        fmt = "clmlf" if find_file(root, _JSON["train"] + _JSON["test"]) else "raw"
    splits, sources = read_clmlf_splits(root, _JSON, 2, cfg.encoding) if fmt == "clmlf" else _load_raw(root, cfg.filter_train, cfg.name, cfg.encoding)
    if not splits:
        raise DataError(f"{root}: no HFM json files (train.json, valid.json, test.json)")
    if cfg.use_translation:
        sources.append(attach_translations(splits, root, cfg.name))
    if cfg.use_attributes:
        raw = _raw_dir(root)
        if cfg.attributes_file:
            attr_path: Path | None = root / cfg.attributes_file
            if not attr_path.is_file():
                raise DataError(f"data.attributes_file: file not found: {attr_path}")
        else:
            attr_path = find_file(root, ["image_attributes.txt", "raw/image_attributes.txt"])
        if attr_path is None:
            raise DataError(f"data.use_attributes: no image_attributes.txt in {root} or {raw or root / 'raw'}")
        attributes = read_attributes(attr_path, cfg.encoding)
        sources.append(attr_path)
        lacking = 0
        for samples in splits.values():
            for s in samples:
                words = attributes.get(s.id)
                lacking += words is None
                s.tags = list(words or [])
        if lacking:
            log.warning("%s: %d post(s) have no image attribute words (given an empty list)", cfg.name, lacking)
    modalities = attach_images(splits, root, cfg.image_dir, IMAGE_DIRS, cfg, lenient=lenient)
    modalities += ("tags",) if cfg.use_attributes else ()
    return finish(cfg.name, splits, "classification", list(LABELS), modalities, sources,
                  normalize_tweet if cfg.normalize_text else None, lenient=lenient)
