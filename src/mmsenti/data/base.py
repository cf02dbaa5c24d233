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
        extra: dataset-specific side information (e.g. HFM image attribute words).
    """

    id: str
    label: int | float | None
    text: str | None = None
    image: Any = None
    features: dict[str, np.ndarray] | None = None
    tags: list[str] | None = None
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
