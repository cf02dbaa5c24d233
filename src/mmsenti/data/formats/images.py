"""Image files: finding them, checking them (missing / unreadable / truncated / too large) and the image policy.

Format is read from the file's content, never its name: the CM-Off-Meme release stores JPEG data under ``.png``
names and that is fine. The fast check parses the header (format and size), looks for the format's end marker
and verifies every PNG chunk's CRC (a PNG with a corrupt body fails it); only files without an end marker are
decoded to decide, so checking thousands of images takes seconds. ``data.image_check: decode`` decodes every
pixel instead.

Every image dataset applies :func:`apply_image_policy` when it loads: each split's image files are checked
before anything trains, and ``data.missing_images`` (``error | drop | blank``) decides what happens to posts
whose image is absent or cannot be used, counted and logged. Images over ``data.max_image_pixels`` are refused
before they are decoded (a decompression bomb is a small file that decodes to gigabytes).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from mmsenti.config import DataConfig
from mmsenti.data.base import DataError, Sample

log = logging.getLogger(__name__)

ImageProblem = Literal["missing", "unreadable", "truncated", "too large"]
IMAGE_PROBLEMS: tuple[ImageProblem, ...] = ("missing", "unreadable", "truncated", "too large")
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
                  cfg: DataConfig, key: Callable[[Sample], str] = lambda s: s.id, *,
                  lenient: bool = False) -> tuple[str, ...]:
    """Point each sample at its image file in the dataset's image folder and apply :func:`apply_image_policy`.

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
    splits.update(apply_image_policy(splits, cfg, folder.path, lenient=lenient))
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


def _png_chunks_ok(path: Path) -> bool:
    """Whether every chunk of a PNG file is complete and matches its CRC, up to IEND (reads, never inflates)."""
    data = path.read_bytes()
    pos = 8  # after the signature
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            return False
        if zlib.crc32(data[pos + 4 : end]) != struct.unpack(">I", data[end : end + 4])[0]:
            return False
        if kind == b"IEND":
            return True
        pos = end + 4
    return False


def set_max_image_pixels(limit: int) -> None:
    """Images above ``limit`` pixels are refused (PIL's process-wide ``Image.MAX_IMAGE_PIXELS``)."""
    if limit <= 0:
        raise DataError(f"data.max_image_pixels must be positive, got {limit}")
    Image.MAX_IMAGE_PIXELS = limit


def image_size_text(error: Exception | None = None, size: tuple[int, int] | None = None) -> str:
    """``"W×H px"``, or the pixel count PIL's own decompression-bomb error gives (it refuses before we see the size)."""
    if size is not None:
        return f"{size[0]}×{size[1]} px"
    match = re.search(r"\((\d+) pixels\)", str(error or ""))
    return f"{match.group(1)} pixels" if match else "size unknown"


def describe_problem(problem: ImageProblem, detail: str | None = None) -> str:
    if problem == "too large":
        return f"too large: {detail}, over the limit of {Image.MAX_IMAGE_PIXELS} pixels (data.max_image_pixels)"
    return problem


def check_image(path: str | Path, decode: bool = False) -> tuple[ImageProblem | None, str | None]:
    """``(problem or None, the image's size as text when known)``; see :func:`inspect_image`."""
    p = Path(path)
    if not p.is_file():
        return "missing", None
    size = None
    try:
        with Image.open(p) as im:
            fmt, size = im.format, im.size
            if size[0] * size[1] > Image.MAX_IMAGE_PIXELS:  # refused before decoding a single pixel
                return "too large", image_size_text(size=size)
            if not decode:
                if fmt == "PNG" and not _png_chunks_ok(p):
                    return ("truncated" if _has_end_marker(p, fmt) is False else "unreadable"), None
                if _has_end_marker(p, fmt) is not False:
                    return None, None
            im.load()  # raises OSError("image file is truncated ...") on a cut-off file
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses it while opening
        return "too large", image_size_text(e, size)
    except (UnidentifiedImageError, SyntaxError, ValueError, struct.error, zlib.error):
        return "unreadable", None
    except OSError as e:
        msg = str(e).lower()
        return ("truncated" if "truncated" in msg or "broken data stream" in msg else "unreadable"), None
    return None, None


def inspect_image(path: str | Path, decode: bool = False) -> ImageProblem | None:
    """What is wrong with an image file, or None when it is fine.

    Args:
        path: the file.
        decode: decode every pixel (slow, thorough). Otherwise the header is parsed (format, size), PNG chunk CRCs
            are verified and the end marker looked for; a JPEG/PNG/GIF without its end marker is decoded to tell a
            truncated file from trailing bytes.
    """
    return check_image(path, decode)[0]


def _progress(total: int, desc: str, force: bool = False):
    from tqdm.auto import tqdm

    # Shown on a terminal only, and (unless forced) only when the check takes more than a couple of seconds.
    return tqdm(total=total, desc=desc, unit="img", leave=False, delay=0 if force else 2,
                disable=not sys.stderr.isatty() or os.environ.get("CI") is not None)


def check_images(samples: Sequence[Sample], decode: bool = False, workers: int = 8, progress: bool = False,
                 desc: str = "checking images") -> list[tuple[Sample, ImageProblem, str]]:
    """``(sample, problem, description)`` for each sample whose image is absent or cannot be used.

    Samples given a blank image already (``extra["image_missing"]``) count as missing; in-memory images are fine.
    Reading is I/O bound, so ``workers`` threads read files.
    """
    out: list[tuple[Sample, ImageProblem, str]] = []
    files: list[Sample] = []
    for s in samples:
        if s.extra.get("image_missing") or s.image is None:
            out.append((s, "missing", "missing"))
        elif isinstance(s.image, (str, Path)):
            files.append(s)
    if not files:
        return out
    bar = _progress(len(files), desc, force=progress)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s, (problem, detail) in zip(files, pool.map(lambda s: check_image(s.image, decode), files), strict=True):
            bar.update(1)
            if problem:
                out.append((s, problem, describe_problem(problem, detail)))
    bar.close()
    return out


def is_missing(s: Sample) -> bool:
    if s.image is None:
        return True
    return isinstance(s.image, (str, Path)) and not os.path.isfile(s.image)


def apply_image_policy(splits: dict[str, list[Sample]], cfg: DataConfig, where: Path | str, *,
                       lenient: bool = False) -> dict[str, list[Sample]]:
    """Check every split's image files and enforce ``data.missing_images`` on those absent or unusable.

    ``error`` raises a :class:`DataError` with the count and the first ids (and what is wrong with each);
    ``drop`` leaves those posts out (logged per split); ``blank`` gives them :func:`blank_image` and marks
    ``extra["image_missing"] = True`` (logged). Never silent. ``lenient`` (the data doctor): nothing is checked;
    the doctor checks and reports itself.
    """
    if cfg.missing_images not in ("error", "drop", "blank"):
        raise DataError(f"data.missing_images: expected error, drop or blank, got {cfg.missing_images!r}")
    set_max_image_pixels(cfg.max_image_pixels)
    if lenient:
        return splits
    everything = [s for v in splits.values() for s in v]
    bad = check_images(everything, decode=cfg.image_check == "decode", progress=cfg.image_check == "decode",
                       desc=f"{cfg.name}: checking images ({cfg.image_check})")
    if not bad:
        return splits
    problem_of = {id(s): (p, d) for s, p, d in bad}
    per_split = {k: [s for s in v if id(s) in problem_of] for k, v in splits.items()}
    n, total = len(bad), len(everything)
    kinds = {p: sum(q == p for _, q, _ in bad) for p in IMAGE_PROBLEMS if any(q == p for _, q, _ in bad)}
    what = "missing" if set(kinds) == {"missing"} else "missing or unusable (" + ", ".join(
        f"{k} {v}" for k, v in kinds.items()) + ")"
    first = [s.id if p == "missing" else f"{s.id} ({d})" for s, p, d in bad][:10]
    if cfg.missing_images == "error":
        raise DataError(f"dataset '{cfg.name}': {n} of {total} images {what} under {where} (first ids: "
                        f"{', '.join(first)}); set data.missing_images=drop to leave those posts out or "
                        f"data.missing_images=blank to give them a blank image")
    counts = ", ".join(f"{k} {len(v)}" for k, v in per_split.items() if v)
    if cfg.missing_images == "drop":
        log.warning("%s: dropped %d post(s) whose image is %s (%s; first ids: %s)", cfg.name, n, what, counts,
                    ", ".join(first[:5]))
        return {k: [s for s in v if id(s) not in problem_of] for k, v in splits.items()}
    log.warning("%s: %d post(s) have no usable image file and get a blank image: %s (%s; first ids: %s; "
                "data.missing_images=blank)", cfg.name, n, what, counts, ", ".join(first[:5]))
    for s, problem, _ in bad:
        s.extra["image_missing"] = True
        s.extra["image_problem"] = problem
        if isinstance(s.image, (str, Path)):
            s.extra["image_path"] = str(s.image)
        s.image = blank_image()
    return splits
