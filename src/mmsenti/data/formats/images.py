"""Image files: finding them, checking them (missing / unreadable / truncated) and the missing-image policy.

Format is read from the file's content, never its name: the CM-Off-Meme release stores JPEG data under ``.png``
names and that is fine. The fast check reads the header and looks for the format's end marker; only files
without one are decoded to decide, so checking thousands of images takes seconds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from mmsenti.data.base import DataError, Sample
from mmsenti.data.formats.common import is_lenient

log = logging.getLogger(__name__)

ImageProblem = Literal["missing", "unreadable", "truncated"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

# The ImageNet mean colour: after the usual normalisation a blank image is ~0 everywhere, i.e. "no evidence".
BLANK_RGB = (124, 116, 104)
_BLANK: Image.Image | None = None


def blank_image() -> Image.Image:
    """The image given to posts whose file is missing under ``missing_images: blank`` (shared, never mutated)."""
    global _BLANK
    if _BLANK is None:
        _BLANK = Image.new("RGB", (32, 32), BLANK_RGB)
    return _BLANK


class ImageFolder:
    """One directory listing, looked up by file name or by stem (``<id>`` finds ``<id>.jpg`` or ``<id>.png``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        names = sorted(os.listdir(self.path))
        self._names = set(names)
        self._by_stem: dict[str, str] = {}
        for n in names:
            stem, ext = os.path.splitext(n)
            if ext.lower() in IMAGE_EXTENSIONS:
                self._by_stem.setdefault(stem, n)

    def find(self, key: str) -> Path | None:
        if key in self._names:
            return self.path / key
        name = self._by_stem.get(key)
        return self.path / name if name else None

    def __len__(self) -> int:
        return len(self._by_stem)


def find_image_dir(root: Path, configured: str | None, candidates: Sequence[str]) -> Path | None:
    """The image directory: ``configured`` (relative to ``root``; an error if absent) or the first candidate.

    None means the copy holds no images: the dataset is then text-only, which is not an error.
    """
    if configured:
        p = Path(configured).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.is_dir():
            raise DataError(f"data.image_dir: directory not found: {p}")
        return p
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return None


def attach_images(splits: dict[str, list[Sample]], root: Path, configured: str | None, candidates: Sequence[str],
                  policy: str, name: str, key: Callable[[Sample], str] = lambda s: s.id) -> tuple[str, ...]:
    """Point each sample at its image file in the dataset's image folder and enforce the missing-image policy.

    Returns the modalities the copy holds: ``("text", "image")`` when an image folder was configured or found
    with images in it, else ``("text",)`` (the images were not downloaded: a text-only copy, not an error).
    """
    image_dir = find_image_dir(root, configured, candidates)
    folder = ImageFolder(image_dir) if image_dir is not None else None
    if folder is None or (not configured and len(folder) == 0):
        return ("text",)
    for samples in splits.values():
        for s in samples:
            s.image = folder.find(key(s))
    splits.update(apply_missing_images(splits, policy, name, folder.path))
    return ("text", "image")


def _has_end_marker(path: Path, fmt: str | None) -> bool | None:
    """True/False when the format has an end marker we can see in the last bytes; None when it has none."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 64))
        tail = f.read()
    if fmt == "JPEG":
        return tail.rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9")  # EOI; some writers pad after it
    if fmt == "PNG":
        return b"IEND" in tail[-16:]
    if fmt == "GIF":
        return tail.endswith(b";")
    return None


def inspect_image(path: str | Path, decode: bool = False) -> ImageProblem | None:
    """What is wrong with an image file, or None when it is fine.

    Args:
        path: the file.
        decode: decode every pixel (slow, thorough). Otherwise the header is parsed and the end marker looked
            for; a JPEG/PNG/GIF without its end marker is decoded to tell a truncated file from trailing bytes.
    """
    p = Path(path)
    if not p.is_file():
        return "missing"
    try:
        with Image.open(p) as im:
            fmt = im.format
            if not decode:
                if _has_end_marker(p, fmt) is not False:
                    return None
            im.load()  # raises OSError("image file is truncated ...") on a cut-off file
    except (UnidentifiedImageError, SyntaxError, ValueError):
        return "unreadable"
    except OSError as e:
        return "truncated" if "truncated" in str(e).lower() or "broken data stream" in str(e).lower() else "unreadable"
    except Image.DecompressionBombError:
        return "unreadable"
    return None


def is_missing(s: Sample) -> bool:
    if s.image is None:
        return True
    return isinstance(s.image, (str, Path)) and not os.path.isfile(s.image)


def apply_missing_images(splits: dict[str, list[Sample]], policy: str, name: str,
                         where: Path | str) -> dict[str, list[Sample]]:
    """Enforce ``data.missing_images`` on samples of an image dataset whose file is absent.

    ``error`` lists the count and first ids; ``drop`` leaves those posts out (logged per split); ``blank`` gives
    them :func:`blank_image` and marks ``extra["image_missing"] = True`` (logged). Never silent.
    """
    missing = {k: [s for s in v if is_missing(s)] for k, v in splits.items()}
    n = sum(len(v) for v in missing.values())
    if n == 0 or is_lenient():
        return splits
    total = sum(len(v) for v in splits.values())
    first = [s.id for v in missing.values() for s in v][:10]
    if policy == "error":
        raise DataError(f"dataset '{name}': {n} of {total} images missing under {where} (first ids: "
                        f"{', '.join(first)}); set data.missing_images=drop to leave those posts out or "
                        f"data.missing_images=blank to give them a blank image")
    counts = ", ".join(f"{k} {len(v)}" for k, v in missing.items() if v)
    if policy == "drop":
        log.warning("%s: dropped %d post(s) whose image is missing (%s; first ids: %s)", name, n, counts,
                    ", ".join(first[:5]))
        return {k: [s for s in v if not is_missing(s)] for k, v in splits.items()}
    if policy == "blank":
        log.warning("%s: %d post(s) have no image file and get a blank image (%s; data.missing_images=blank)",
                    name, n, counts)
        for v in missing.values():
            for s in v:
                s.extra["image_missing"] = True
                if s.image is not None:
                    s.extra["image_path"] = str(s.image)
                s.image = blank_image()
        return splits
    raise DataError(f"data.missing_images: expected error, drop or blank, got {policy!r}")
