"""A backbone's image preprocessing as a callable: PIL image → normalised (3, size, size) tensor.

:class:`~mmsenti.backbones.presets.ImagePreprocessing` describes it for each preset; the data's
:class:`~mmsenti.data.processing.Processor` applies it to every image and saves its fields with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


@dataclass
class ImageTransform:
    """Resize (+ optional centre crop) and normalise, as the backbone's pretrained config asks.

    ``resize="squash"`` resizes straight to ``size``×``size``; ``resize="shorter"`` resizes the shorter side to
    ``size / crop_pct`` and centre-crops ``size`` (timm's eval transform).
    """

    size: int = 64
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    resize: str = "squash"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def _plan(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized width, resized height, crop left, crop top) for an image of ``width`` × ``height``."""
        if self.resize == "squash":
            return self.size, self.size, 0, 0
        scale = self.size / self.crop_pct / min(width, height)
        w, h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        return w, h, (w - self.size) // 2, (h - self.size) // 2

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of a ``width`` × ``height`` image the model sees, in its pixels: (left, top, right, bottom).

        ``squash``: the whole image (stretched to a square, so a square cell of the model's input covers a
        ``width/size`` × ``height/size`` rectangle of it); ``shorter``: the centre crop, a square of the image.
        """
        w, h, left, top = self._plan(width, height)
        sx, sy = width / w, height / h
        return left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        interp = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[self.interpolation]
        # Resize only the part the model sees (the centre crop's box in source pixels), never the whole image: the
        # same pixels as resize-then-crop (to one 8-bit level), and a 1x6000 image costs size^2, not size x 1.5M.
        img = img.resize((self.size, self.size), interp, box=self.source_box(img.width, img.height))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std
