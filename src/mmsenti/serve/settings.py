"""Limits and options of the service, all configurable (``mmsenti serve --help`` lists them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mmsenti.data.base import MAX_IMAGE_ASPECT, MIN_IMAGE_SIDE

API_KEY_ENV = "MMSENTI_API_KEY"


@dataclass
class ServeSettings:
    # Request limits. A request over a limit gets a 4xx naming the field, never a 500.
    max_body_bytes: int = 32 * 2**20  # whole request body
    max_image_bytes: int = 8 * 2**20  # one encoded image
    max_image_pixels: int = 40_000_000  # width × height, checked before decoding (decompression bombs)
    max_image_aspect: float = MAX_IMAGE_ASPECT  # longer side / shorter side (a thin image's resize and figures)
    min_image_side: int = MIN_IMAGE_SIDE  # pixels
    max_text_chars: int = 5000
    max_posts: int = 64  # posts in one request
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # PIL format names
    # Access: when set, every /v1 route needs header ``X-API-Key: KEY`` (or ``Authorization: Bearer KEY``).
    api_key: str | None = field(default_factory=lambda: os.environ.get(API_KEY_ENV) or None)
    # A post lacking a modality the model reads is a 422 unless this is on (models trained with modality dropout).
    allow_missing_modality: bool = False
    # Micro-batching: posts of concurrent requests share one model call of at most max_batch_size posts; an idle
    # model waits up to max_wait_ms for more posts to arrive before it starts.
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    model_name: str | None = None  # shown by /v1/model and in every answer; default: the run directory's name

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_text_chars", "max_posts",
                     "max_batch_size", "min_image_side", "max_image_aspect"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        self.image_formats = tuple(f.upper() for f in self.image_formats)

    def limits(self) -> dict[str, object]:
        return {"max_body_bytes": self.max_body_bytes, "max_image_bytes": self.max_image_bytes,
                "max_image_pixels": self.max_image_pixels, "max_image_aspect": self.max_image_aspect,
                "min_image_side": self.min_image_side, "max_text_chars": self.max_text_chars,
                "max_posts": self.max_posts, "image_formats": list(self.image_formats)}
