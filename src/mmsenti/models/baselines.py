"""Late fusion and its unimodal baselines (the comparisons every multimodal sentiment paper reports)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmsenti.config import ConfigError, ModelConfig
from mmsenti.models.base import MultimodalModel, TaskInfo
from mmsenti.models.encoders import build_image_encoder, build_text_encoder
from mmsenti.models.factory import register_tiny
from mmsenti.registry import MODELS


@dataclass
class LateFusionConfig(ModelConfig):
    name: str = "late-fusion"
    hidden: int = 256  # width of the MLP head


@dataclass
class TextOnlyConfig(LateFusionConfig):
    name: str = "text-only"
    modalities: list[str] = field(default_factory=lambda: ["text"])


@dataclass
class ImageOnlyConfig(LateFusionConfig):
    name: str = "image-only"
    modalities: list[str] = field(default_factory=lambda: ["image"])


class LateFusion(MultimodalModel):
    """Mean-pooled text tokens ‖ pooled image regions → MLP. With one modality it is that modality's baseline."""

    backbone_prefixes = ("text_encoder.backbone.", "image_encoder.")

    def __init__(self, cfg: LateFusionConfig, info: TaskInfo, processor, load_weights: bool = True,
                 inference: bool = False):
        super().__init__(cfg, info, inference)
        unknown = set(cfg.modalities) - {"text", "image"}
        if unknown or not cfg.modalities:
            raise ConfigError(f"model.modalities: {cfg.name} reads text and/or image, got {cfg.modalities}")
        width = 0
        self.text_encoder = self.image_encoder = None
        if "text" in cfg.modalities:
            self.text_encoder = build_text_encoder(cfg.text_encoder, processor.tokenizer, load_weights)
            self.text_encoder.needed_states = {-1}
            width += self.text_encoder.width
        if "image" in cfg.modalities:
            self.image_encoder = build_image_encoder(cfg.image_encoder, load_weights, text=cfg.text_encoder,
                                                     processor=processor)
            width += self.image_encoder.width
        self.head = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, info.num_outputs),
        )

    def forward(self, batch: dict) -> dict:
        feats = []
        if self.text_encoder is not None:
            feats.append(self.text_encoder.encode_batch(batch).mean_pool())
        if self.image_encoder is not None:
            feats.append(self.image_encoder.encode_batch(batch).mean_pool())
        return {"logits": self.head(torch.cat(feats, dim=-1))}


def _check_modalities(cfg: ModelConfig, expected: list[str]) -> None:
    if cfg.modalities != expected:
        raise ConfigError(f"model.modalities: '{cfg.name}' reads only {expected}; use late-fusion for others")


@MODELS.register("late-fusion", config=LateFusionConfig, description="pooled text ‖ pooled image → MLP")
def late_fusion(cfg: LateFusionConfig, info: TaskInfo, processor, load_weights: bool = True, inference: bool = False) -> LateFusion:
    return LateFusion(cfg, info, processor, load_weights, inference)


@MODELS.register("text-only", config=TextOnlyConfig, description="unimodal baseline: pooled text → MLP")
def text_only(cfg: TextOnlyConfig, info: TaskInfo, processor, load_weights: bool = True, inference: bool = False) -> LateFusion:
    _check_modalities(cfg, ["text"])
    return LateFusion(cfg, info, processor, load_weights, inference)


@MODELS.register("image-only", config=ImageOnlyConfig, description="unimodal baseline: pooled image → MLP")
def image_only(cfg: ImageOnlyConfig, info: TaskInfo, processor, load_weights: bool = True, inference: bool = False) -> LateFusion:
    _check_modalities(cfg, ["image"])
    return LateFusion(cfg, info, processor, load_weights, inference)


# Tiny variants (tests, CPU smoke runs): `model.name: late-fusion-tiny`.
register_tiny("late-fusion", hidden=32)
register_tiny("text-only", hidden=32)
register_tiny("image-only", hidden=32)
