"""What every dataset yields: samples, splits, label names and the modalities it has."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmsenti.errors import DataError

Task = Literal["classification", "regression"]
SPLITS = ("train", "dev", "test")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenized, or None. The one check every edge (files, CLI rows, the service) runs.

    A lone UTF-16 surrogate (``"\\ud800"``, legal in JSON and in a Python ``str``) has no UTF-8 encoding, and the
    Rust tokenizers raise on it deep inside a batch.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds an unpaired UTF-16 surrogate (U+{ord(text[e.start]):04X}) at character {e.start}"
    return None


# A post's tags (read by the ``tags`` image encoder): a tag is a word or a short phrase. Longer ones are refused
# wherever tags enter (files, prediction rows, the service), not cut: a 500-character "tag" is a mistake in the data.
MAX_TAG_CHARS = 64
TAG_SEPARATOR = "|"  # between the tags of one CSV/TSV cell, a form field or ``mmsenti predict --tags``


def parse_tags(value: Any, *, cell: bool = False, max_count: int | None = None) -> list[str] | None:
    """A post's tags as given: a list of strings (JSON), or with ``cell`` one string of ``|``-separated tags (a CSV
    cell, a form field, a command-line value). None when absent (null, or an empty cell). Every edge reads tags here.

    Raises:
        DataError: why the value is not a post's tags (not a list of strings, an element that is not a string, an
            empty tag, a tag over :data:`MAX_TAG_CHARS` characters, over ``max_count`` tags), without the field's
            name: the caller says where (``file:line: tags: ...``, or the service's ``posts[i].tags``).
    """
    if value is None or (cell and isinstance(value, str) and not value.strip()):
        return None
    if cell and isinstance(value, str):
        value = [t.strip() for t in value.split(TAG_SEPARATOR)]
    if not isinstance(value, list):
        raise DataError(f"must be a list of strings{' (tags separated by |)' if cell else ''}, "
                        f"got {type(value).__name__}")
    if max_count is not None and len(value) > max_count:
        raise DataError(f"{len(value)} tags, at most {max_count}")
    for i, tag in enumerate(value):
        if not isinstance(tag, str):
            raise DataError(f"item {i} is {type(tag).__name__}, not a string")
        if not tag.strip():
            raise DataError(f"item {i} is an empty tag")
        if len(tag) > MAX_TAG_CHARS:
            raise DataError(f"item {i} has {len(tag)} characters, at most {MAX_TAG_CHARS} (a tag is a word or a "
                            "short phrase)")
        if (problem := text_problem(tag)) is not None:
            raise DataError(f"item {i} {problem}")
    return value


@dataclass
class Sample:
    """One post or clip.

    Attributes:
        id: unique within the dataset.
        label: class index (classification) or score (regression); None when unlabelled (prediction).
        text: the post's text or the clip's transcript.
        image: a path to an image file, or an in-memory ``PIL.Image`` (generated datasets).
        features: per-modality feature sequences of shape (T, D) (e.g. MMSA audio/vision), keyed by modality.
        tags: words or ids describing the image (HFM's attribute words, TumEmo's detected scenes and objects), read
            by the ``tags`` image encoder; None when the post has none.
        video: a clip's path, for a model that extracts its own features (``model.extraction``) when ``features``
            lacks them (prediction of a new clip).
        extra: dataset-specific side information (e.g. HFM image attribute words).
    """

    id: str
    label: int | float | None
    text: str | None = None
    image: Any = None
    features: dict[str, np.ndarray] | None = None
    tags: list[str] | None = None
    video: str | Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetBundle:
    """A dataset's official splits with what a model needs to know about them."""

    name: str
    splits: dict[str, list[Sample]]
    task: Task
    label_names: list[str] | None  # None for regression
    modalities: tuple[str, ...]  # what the data actually holds: "text", "image", "tags", "audio", "vision"
    sources: list[Path] = field(default_factory=list)  # files read, for cache keys and reports
    inferred_labels: bool = False  # label_names were read off the data (the doctor then checks them for typos)
    feature_dims: dict[str, int] = field(default_factory=dict)  # width of each feature modality, where known
    extraction: dict[str, Any] | None = None  # the settings its features were extracted with (`features` datasets)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 1

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            raise DataError(f"dataset '{self.name}' has no split '{name}' (has: {', '.join(self.splits)})")
        return self.splits[name]


# Where one post's image is read to be served or explained (mmsenti serve, mmsenti explain): a long thin image costs
# far more than its pixel count says. Resizing its shorter side to the model's input multiplies the longer one
# (1x6000 -> 224x1,344,000), and figures drawn at its aspect ratio grow with it.
MAX_IMAGE_ASPECT = 20.0  # longer side / shorter side
MIN_IMAGE_SIDE = 8  # pixels


def image_shape_problem(width: int, height: int, max_aspect: float = MAX_IMAGE_ASPECT,
                        min_side: int = MIN_IMAGE_SIDE) -> str | None:
    """Why an image of ``width`` x ``height`` pixels is refused (too thin, or a side too short), or None."""
    short, long = min(width, height), max(width, height)
    if short < min_side:
        return f"image of {width}x{height} pixels: a side under {min_side} pixels (the minimum)"
    if long > max_aspect * short:
        return f"image of {width}x{height} pixels: aspect ratio {long / short:.1f}:1, over the limit of {max_aspect:g}:1"
    return None
