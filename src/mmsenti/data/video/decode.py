"""Reading a clip: its audio track as mono float PCM and its frames sampled at a fixed rate, through PyAV (the ``av``
wheel bundles FFmpeg's decoders, so nothing outside PyPI is needed).

Each stream is read in its own pass over the file: the audio is kept whole (16 kHz float32 is 3.8 MB a minute), the
frames are yielded one at a time, scaled down in FFmpeg to at most ``max_side`` pixels, so a long or 4K clip never
sits in memory decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmsenti.errors import DataError

# FFmpeg decodes a frame whole before it is scaled down: a crafted header of 100,000 x 100,000 pixels would ask for
# gigabytes. Larger frames than 8K UHD are refused from the header.
MAX_FRAME_PIXELS = 7680 * 4320


def _av():
    try:
        import av
    except ImportError:
        raise DataError("reading video needs PyAV: pip install 'mmsenti[video]' (or pip install av)") from None
    return av


@dataclass(frozen=True)
class ClipInfo:
    duration: float  # seconds (the longer stream's)
    has_audio: bool
    has_video: bool
    width: int
    height: int
    fps: float  # the video stream's average frame rate (0 when unknown)


def _open(path: Path):
    av = _av()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return av.open(str(path), "r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable video ({type(e).__name__}: {e})") from None


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    return 0.0


def probe(path: str | Path) -> ClipInfo:
    """What a clip holds, from its header (nothing decoded)."""
    path = Path(path)
    with _open(path) as c:
        v = c.streams.video[0] if c.streams.video else None
        a = c.streams.audio[0] if c.streams.audio else None
        duration = max([_duration(c, s) for s in (v, a) if s is not None] or [0.0])
        rate = float(v.average_rate) if v is not None and v.average_rate else 0.0
        return ClipInfo(duration, a is not None, v is not None, v.codec_context.width if v else 0,
                        v.codec_context.height if v else 0, rate)


def read_audio(path: str | Path, sample_rate: int, max_seconds: float) -> np.ndarray:
    """The audio track, mixed to mono and resampled to ``sample_rate``: float32 in [-1, 1].

    Raises:
        DataError: unreadable, no audio track, or longer than ``max_seconds``.
    """
    av = _av()
    path = Path(path)
    limit = int(max_seconds * sample_rate)
    with _open(path) as c:
        if not c.streams.audio:
            raise DataError(f"{path}: has no audio track")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        parts, n = [], 0
        try:
            for frame in c.decode(c.streams.audio[0]):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    n += parts[-1].size
                if n > limit:
                    raise DataError(f"{path}: longer than {max_seconds:g} s (extraction.max_seconds)")
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            raise DataError(f"{path}: audio cannot be decoded ({type(e).__name__}: {e})") from None
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def iter_frames(path: str | Path, fps: float, max_side: int, max_seconds: float
                ) -> Iterator[tuple[float, np.ndarray]]:
    """``(time, RGB uint8 array (H, W, 3))`` of the frames nearest to 0, 1/fps, 2/fps, ... seconds, each scaled so
    its longer side is at most ``max_side`` pixels.

    Raises:
        DataError: unreadable, no video stream, or longer than ``max_seconds``.
    """
    av = _av()
    path = Path(path)
    with _open(path) as c:
        if not c.streams.video:
            raise DataError(f"{path}: has no video stream")
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > MAX_FRAME_PIXELS:
            raise DataError(f"{path}: frames of {w}x{h} pixels, over the limit of {MAX_FRAME_PIXELS:,} (8K UHD)")
        scale = min(1.0, max_side / max(w, h, 1))
        # Even sizes: the scaler's chroma subsampling wants them, and a 1-pixel difference is no loss.
        size = (max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2))
        step, due = 1.0 / fps, 0.0
        try:
            for frame in c.decode(stream):
                if frame.time is None:
                    continue
                t = float(frame.time)
                if t > max_seconds:
                    raise DataError(f"{path}: longer than {max_seconds:g} s (extraction.max_seconds)")
                if t + 1e-6 < due:
                    continue
                yield t, frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                while due <= t + 1e-6:  # a clip at a lower frame rate than fps gives each frame once
                    due += step
        except av.error.FFmpegError as e:
            raise DataError(f"{path}: video cannot be decoded ({type(e).__name__}: {e})") from None
