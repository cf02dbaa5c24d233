"""Limits and options of the service, all configurable: each written once, as a field of :class:`ServeSettings`,
whose metadata make its ``mmsenti serve`` flag (:meth:`ServeSettings.add_arguments`, :meth:`ServeSettings.from_args`)."""

from __future__ import annotations

import argparse
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from mmsenti.data.base import MAX_IMAGE_ASPECT, MIN_IMAGE_SIDE

API_KEY_ENV = "MMSENTI_API_KEY"
MB = 2**20


def setting(default: Any = MISSING, help: str | None = None, *, limit: bool = False, minimum: float | None = None,
            mb: bool = False, default_factory: Any = MISSING) -> Any:
    """A field of :class:`ServeSettings` and its command-line flag ``--name-with-dashes``.

    Args:
        help: the flag's help.
        limit: a request limit (``GET /v1/model`` lists them).
        minimum: the smallest value accepted (None: any).
        mb: a byte count given on the command line in MB (``--max-body-mb`` sets ``max_body_bytes``).
    """
    meta = {"help": help, "limit": limit, "minimum": minimum, "mb": mb}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ServeSettings:
    # Access: when set, every /v1 route needs header ``X-API-Key: KEY`` (or ``Authorization: Bearer KEY``).
    api_key: str | None = setting(help=f"require this key on every /v1 route (default: ${API_KEY_ENV} if set)",
                                  default_factory=lambda: os.environ.get(API_KEY_ENV) or None)
    # A post lacking a modality the model reads is a 422 unless this is on (models trained with modality dropout).
    allow_missing_modality: bool = setting(
        False, "accept posts without one of the model's modalities (models trained with modality dropout)")
    # Micro-batching: posts of concurrent requests share one model call of at most max_batch_size posts; an idle
    # model waits up to max_wait_ms for more posts to arrive before it starts.
    max_batch_size: int = setting(32, "posts per model call", minimum=1)
    max_wait_ms: float = setting(5.0, "how long an idle model waits for more posts to batch", minimum=0)
    # Request limits. A request over a limit gets a 4xx naming the field, never a 500.
    max_body_bytes: int = setting(32 * MB, "whole request body", limit=True, minimum=1, mb=True)
    max_image_bytes: int = setting(8 * MB, "one encoded image", limit=True, minimum=1, mb=True)
    max_image_pixels: int = setting(40_000_000, "width × height, checked before decoding (decompression bombs)",
                                    limit=True, minimum=1)
    max_image_aspect: float = setting(MAX_IMAGE_ASPECT, "longest side / shortest side of an image", limit=True,
                                      minimum=1)
    min_image_side: int = setting(MIN_IMAGE_SIDE, "pixels", limit=True, minimum=1)
    max_text_chars: int = setting(5000, "characters of a post's text", limit=True, minimum=1)
    max_posts: int = setting(64, "posts per request", limit=True, minimum=1)
    # A tags model reads a post's first max_tags tags (GET /v1/model); more are accepted up to this limit.
    max_post_tags: int = setting(256, "tags of one post (a model whose image encoder is tags)", limit=True, minimum=1)
    # A clip model (trained on `mmsenti features extract` output) reads a multipart `video` file.
    max_video_bytes: int = setting(32 * MB, "one uploaded clip (a clip model)", limit=True, minimum=1, mb=True)
    max_video_seconds: float = setting(120.0, "duration of one uploaded clip", limit=True, minimum=0.1)
    image_formats: tuple[str, ...] = setting(("JPEG", "PNG", "WEBP", "GIF", "BMP"),
                                             "accepted image formats (PIL names)", limit=True)
    model_name: str | None = setting(None, "name shown in answers (default: the run directory's name)")

    def __post_init__(self) -> None:
        for f in fields(self):
            minimum = f.metadata["minimum"]
            if minimum is not None and getattr(self, f.name) < minimum:
                raise ValueError(f"{f.name} must be >= {minimum}, got {getattr(self, f.name)}")
        self.image_formats = tuple(f.upper() for f in self.image_formats)

    def limits(self) -> dict[str, object]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.metadata["limit"]}

    # ------------------------------------------------------------------------------------------ command line
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """A flag per setting; its default is the setting's (a default read from the environment stays unset)."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            kind = _cli_type(hints[f.name])
            kwargs: dict[str, Any] = {"help": f.metadata["help"] + (" (MB)" if f.metadata["mb"] else "")}
            default = f.default if f.default is not MISSING else None
            if kind is bool:
                kwargs["action"] = "store_true"
            elif kind is tuple:
                kwargs["default"] = ",".join(default)
            else:
                kwargs.update(type=float if f.metadata["mb"] else kind,
                              default=default / MB if f.metadata["mb"] else default)
            parser.add_argument(_flag(f), **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeSettings:
        """The settings the flags of :meth:`add_arguments` give; ValueError for a value out of range."""
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            value = getattr(args, _flag(f)[2:].replace("-", "_"))
            kind = _cli_type(hints[f.name])
            if kind is str and not value:  # not given ('' too): the default (for --api-key, $MMSENTI_API_KEY)
                continue
            if kind is tuple:
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif f.metadata["mb"]:
                value = int(value * MB)
            kwargs[f.name] = value
        return cls(**kwargs)


def _flag(f) -> str:
    name = f.name.removesuffix("_bytes") + "_mb" if f.metadata["mb"] else f.name
    return "--" + name.replace("_", "-")


def _cli_type(hint: Any) -> type:
    """``int``, ``float``, ``bool``, ``str`` or ``tuple`` (a comma-separated list) for a field's type."""
    if typing.get_origin(hint) is tuple:
        return tuple
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
