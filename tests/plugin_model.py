"""A model in one file, as another package would add one: its input builder, config, model and registration.

``trigram-fusion`` reads the text as a bag of hashed character trigrams (an input kind mmsenti does not have: the
``char-trigrams`` builder below) and the image through mmsenti's small CNN, and fuses their pooled features with an
MLP. Nothing else names it: it is registered through the public registries (imported by a test, or found through
the ``mmsenti.models`` entry-point group), and mmsenti trains, saves, loads, explains, exports and serves it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmsenti.config import ConfigError, InputSpec, ModelConfig
from mmsenti.data.inputs import InputBuilder, random_lengths
from mmsenti.models.base import MultimodalModel, TaskInfo
from mmsenti.models.encoders import build_image_encoder
from mmsenti.registry import INPUTS, MODELS


@INPUTS.register("char-trigrams", description="trigram_ids + trigram_mask: the text's hashed character trigrams")
class CharTrigrams(InputBuilder):
    """The text, lower-cased and padded with a space each side, as the ids of its character trigrams hashed into
    ``buckets`` (1..buckets; 0 pads), at most ``max_trigrams`` per post, with a 0/1 mask. No vocabulary: nothing
    to learn or save but the two numbers."""

    def __init__(self, spec: InputSpec, buckets: int, max_trigrams: int):
        super().__init__(spec)
        self.buckets, self.max_trigrams = buckets, max_trigrams

    @classmethod
    def keys_of(cls, spec: InputSpec) -> tuple[str, ...]:
        return ("trigram_ids", "trigram_mask")

    @classmethod
    def create(cls, model_config, spec, train_texts, made) -> CharTrigrams:
        return cls(spec, model_config.buckets, model_config.max_trigrams)

    def ids(self, text: str) -> list[int]:
        t = f" {text.lower()} "
        return [zlib.crc32(t[i:i + 3].encode()) % self.buckets + 1 for i in range(len(t) - 2)][: self.max_trigrams]

    def build(self, samples, batch, ctx) -> None:
        rows = [self.ids(s.text or "") for s in samples]
        length = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        batch["trigram_ids"], batch["trigram_mask"] = ids, (ids > 0).long()

    def state(self) -> dict[str, Any]:
        return {"buckets": self.buckets, "max_trigrams": self.max_trigrams}

    def graph_inputs(self):
        return [(k, "int64", ["batch", "trigrams"]) for k in self.keys()]

    def axis_limits(self) -> dict[str, int]:
        return {"trigrams": self.max_trigrams}

    def example(self, batch_size, length, g) -> dict[str, torch.Tensor]:
        n = length or self.max_trigrams
        mask = (torch.arange(n)[None] < random_lengths(batch_size, n, 1, g)[:, None]).long()
        return {"trigram_ids": torch.randint(1, self.buckets + 1, (batch_size, n), generator=g) * mask,
                "trigram_mask": mask}


@dataclass
class TrigramFusionConfig(ModelConfig):
    name: str = "trigram-fusion"
    buckets: int = 512  # hash buckets of the character trigrams
    max_trigrams: int = 96  # per post; longer texts are cut
    width: int = 32  # trigram embedding width
    hidden: int = 32  # MLP width

    def inputs(self) -> list[InputSpec]:
        return [*([InputSpec("char-trigrams", "text")] if "text" in self.modalities else []),
                *([InputSpec("pixels", "image")] if "image" in self.modalities else [])]

    def card(self) -> dict[str, Any]:
        return {"backbones": {**({"text": f"char-trigrams/{self.buckets}"} if "text" in self.modalities else {}),
                              **({"image": self.image_encoder.name} if "image" in self.modalities else {})}}


class TrigramFusion(MultimodalModel):
    """Mean trigram embedding ‖ mean-pooled image regions → MLP."""

    backbone_prefixes = ("image_encoder.",)

    def __init__(self, cfg: TrigramFusionConfig, info: TaskInfo, processor, load_weights: bool = True,
                 inference: bool = False):
        super().__init__(cfg, info, inference)
        if not cfg.modalities or set(cfg.modalities) - {"text", "image"}:
            raise ConfigError(f"model.modalities: trigram-fusion reads text and/or image, got {cfg.modalities}")
        self.embed = nn.Embedding(cfg.buckets + 1, cfg.width, padding_idx=0) if "text" in cfg.modalities else None
        self.image_encoder = build_image_encoder(cfg.image_encoder, load_weights) if "image" in cfg.modalities else None
        width = (cfg.width if self.embed is not None else 0) + (self.image_encoder.width if self.image_encoder else 0)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, cfg.hidden), nn.GELU(),
                                  nn.Linear(cfg.hidden, info.num_outputs))

    def forward(self, batch: dict) -> dict:
        feats = []
        if self.embed is not None:
            mask = batch["trigram_mask"].unsqueeze(-1).float()
            feats.append((self.embed(batch["trigram_ids"]) * mask).sum(1) / mask.sum(1).clamp_min(1.0))
        if self.image_encoder is not None:
            feats.append(self.image_encoder.encode_batch(batch).mean_pool())
        return {"logits": self.head(torch.cat(feats, -1))}


@MODELS.register("trigram-fusion", config=TrigramFusionConfig,
                 description="hashed character trigrams ‖ pooled image → MLP (a plugin model)")
def trigram_fusion(cfg: TrigramFusionConfig, info: TaskInfo, processor, load_weights: bool = True,
                   inference: bool = False) -> TrigramFusion:
    return TrigramFusion(cfg, info, processor, load_weights, inference)
