"""Generated clips for the tests and the extraction benchmark: no MOSI/MOSEI clip exists here.

A clip is a real photograph that ships inside scikit-image (``data.astronaut()``, a face) moving and growing across
the frames over a dark background (or the background alone: a clip without a face), and speech synthesised by
espeak-ng (Debian's ``espeak-ng``) at a chosen pitch, muxed into an ``.mp4`` (H.264 + AAC) through PyAV.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from mmsenti.errors import DataError

SENTENCES = (
    "I watched the whole thing last night",
    "the film runs for about two hours",
    "we talked about it on the way home",
    "the second part takes place in a small town",
    "there is a long scene in the kitchen",
    "my sister saw it at the weekend",
    "it was shown in the big room downstairs",
    "the actors spoke with a northern accent",
)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, pitch: int, speed: int = 160) -> tuple[np.ndarray, int]:
    """``(int16 mono PCM, sample rate)`` of ``text`` spoken by espeak-ng at ``pitch`` (0-99)."""
    if not espeak_available():
        raise DataError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-p", str(pitch), "-s", str(speed), "-w", str(wav), text], check=True,
                       capture_output=True, timeout=60)
        with wave.open(str(wav)) as w:
            return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), w.getframerate()


def make_clip(path: str | Path, text: str, pitch: int, *, face: bool = True, fps: int = 15,
              size: tuple[int, int] = (256, 192), audio: bool = True, seed: int = 0) -> float:
    """Write a clip of ``text`` spoken at ``pitch`` to ``path``; returns its duration in seconds."""
    import av
    from PIL import Image
    from skimage import data

    pcm, rate = speak(text, pitch)
    duration = len(pcm) / rate
    rng = np.random.default_rng(seed)
    photo = Image.fromarray(data.astronaut())
    x0, y0, s0 = rng.uniform(-30, 30), rng.uniform(-20, 0), rng.uniform(0.45, 0.6)
    with av.open(str(path), "w") as c:
        video = c.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        sound = c.add_stream("aac", rate=rate) if audio else None
        n = max(1, int(round(duration * fps)))
        for i in range(n):
            canvas = Image.new("RGB", size, (30, 30, 30))
            if face:
                scale = s0 + 0.15 * i / n
                side = int(photo.width * scale)
                canvas.paste(photo.resize((side, side)), (int(x0 + 40 * i / n), int(y0)))
            for packet in video.encode(av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")):
                c.mux(packet)
        for packet in video.encode():
            c.mux(packet)
        if sound is not None:
            frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in sound.encode(frame):
                c.mux(packet)
            for packet in sound.encode():
                c.mux(packet)
    return duration


def make_clip_set(folder: str | Path, n: int, *, splits: dict[str, int] | None = None, seed: int = 0,
                  low: int = 15, high: int = 85) -> Path:
    """``n`` clips in ``folder`` plus ``clips.jsonl`` (video, text, label, split): half spoken low (label ``low``),
    half high (``high``), with the same sentences on both sides, so only the audio tells the label apart; every
    fifth clip has no face. ``splits``: clips per split in order (default: all train). Returns the JSONL path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = [s for s, k in (splits or {"train": n}).items() for _ in range(k)]
    if len(order) != n:
        raise ValueError(f"splits add up to {len(order)}, not {n}")
    rows = []
    for i in range(n):
        label = "high" if i % 2 else "low"
        text = SENTENCES[(i // 2) % len(SENTENCES)]
        name = f"clip{i:03d}.mp4"
        make_clip(folder / name, text, high if label == "high" else low, face=i % 5 != 4, seed=seed * 1000 + i)
        rows.append({"id": f"c{i:03d}", "video": name, "text": text, "label": label, "split": order[i]})
    out = folder / "clips.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
