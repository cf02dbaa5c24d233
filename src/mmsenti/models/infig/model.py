"""INFIG: image-text sentiment with CLIP-assisted global alignment (GAM), hierarchical fine-grained alignment
(HFAM) and transformer fusion.

Shapes (B batch, d = ``width``):

* image: CNN map → d → [CLS] + regions → ``image_layers`` transformer layers (every layer kept);
* text: an HF encoder (every layer kept), projected to d when its width differs;
* GAM (training only): i_g = [i_cls ; W_i·clip_img], t_g = [t_cls ; W_t·clip_txt] at layer ``gam_layer`` from the
  end, contrasted against momentum features of the batch and two queues (ALBEF ITC), eqs. (1)-(2); the momentum
  encoders follow the online ones by one EMA step per optimiser step (``on_optimizer_step``);
* HFAM (training only): token-wise top-j similarities over the last ``hfam_layers`` layers, InfoNCE over the
  batch, eqs. (3)-(6); [CLS] and padding excluded;
* fusion: transformer over [image tokens ; text tokens] (text padding masked) → attention pooling (8-9) →
  GELU projection (10) → classifier (11). Loss (12): L_sc + λg·L_g + λf·L_f.

A switched-off module (``use_clip``, ``use_gam``, ``use_hfam``) is not built: no parameters, no compute, no
momentum copy. CLIP is only read by GAM, so ``use_gam: false`` also drops CLIP.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmsenti.config import ConfigError, ImageEncoderConfig, InputSpec, ModelConfig, TextEncoderConfig, merge
from mmsenti.models.base import MultimodalModel, TaskInfo
from mmsenti.models.encoders import ImageTransformerEncoder, build_image_encoder, build_text_encoder
from mmsenti.models.explanations import Explained, WordRegions
from mmsenti.models.factory import register_tiny
from mmsenti.models.infig.alignment import (
    FineGrainedAlignmentLoss,
    GlobalAlignmentLoss,
    LearnableTemperature,
    make_momentum_copy,
    momentum_update,
    token_similarity,
)
from mmsenti.models.layers import AttentionPool, TransformerBlock
from mmsenti.registry import MODELS

log = logging.getLogger(__name__)


@dataclass
class ClipConfig:
    # 'tiny-random': a small randomly initialised HF CLIPModel (architecture stand-in for tests and the offline
    # scenes demo: its features carry no prior). Otherwise a CLIP preset / HF id / local dir with weights.
    name: str = "tiny-random"
    pretrained: bool | str | None = True  # true = the preset's weights; a path / hub id; false = random
    arch: dict[str, Any] = field(default_factory=dict)  # CLIPConfig overrides (random stand-ins: {"text_config": {...}})
    # Sizes of the tiny-random CLIP only:
    width: int = 32
    num_layers: int = 1
    num_heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    projection_dim: int = 32


@dataclass
class InfigConfig(ModelConfig):
    name: str = "infig"
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(num_layers=3))
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    width: int = 128  # d: width of aligned tokens (both encoders) and of fusion
    image_layers: int = 6  # N_i transformer layers over CNN regions (paper: 6)
    image_heads: int = 4
    fusion_layers: int = 3  # paper: 3 (4 for HFM)
    fusion_heads: int = 4
    use_clip: bool = True
    clip: ClipConfig = field(default_factory=ClipConfig)
    clip_dim: int = 128  # CLIP embeddings are projected to this width before concatenation with [CLS]
    use_gam: bool = True
    gam_layer: int = 1  # layer (from the end, 1 = last) whose [CLS] tokens GAM aligns (paper Fig. 3: 1..4)
    queue_size: int = 4096
    momentum: float = 0.995
    temperature: float = 0.07  # initial τ of both contrastive losses (learnable, clamped)
    use_hfam: bool = True
    hfam_layers: int = 3  # M: last layers of both encoders aligned token-wise
    top_j: int = 2  # j: paper 2 for MVSA, 3 for HFM and TumEmo
    hfam_chunk_size: int | None = None  # texts per chunk in the token-similarity tensor (bounds memory)
    lambda_g: float = 0.3
    lambda_f: float = 0.2
    # Training only, both modalities: per sample, with this probability one modality (chosen uniformly) is hidden
    # from fusion, so the classifier cannot lean on one modality's quirks (ModDrop, Neverova et al. 2015).
    # The alignment losses still see both modalities.
    modality_dropout: float = 0.0

    @property
    def clip_active(self) -> bool:
        """CLIP is only read by GAM (in training); the processor prepares CLIP inputs only then."""
        return (self.use_clip and self.use_gam and set(self.modalities) == {"image", "text"}
                and self.image_encoder.name != "tags")

    def inputs(self) -> list[InputSpec]:
        # GAM's CLIP prior reads its own tokenization and image preprocessing, in training only.
        return super().inputs() + ([InputSpec("clip", training_only=True)] if self.clip_active else [])

    @property
    def learns_missing_modalities(self) -> bool:
        return self.modality_dropout > 0


def modality_drop(batch_size: int, p: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 2) bool: which of (image, text) to hide per sample. A sample is hit with probability ``p``, then one
    modality is chosen uniformly; never both, so fusion always has a token to attend to."""
    hit = torch.rand(batch_size, generator=generator) < p
    which = torch.randint(0, 2, (batch_size,), generator=generator)
    return torch.stack([hit & (which == 0), hit & (which == 1)], 1).to(device)


def stable_sample_index(ids: list[str]) -> torch.Tensor:
    """Non-negative int64 per sample id (stable across processes), so GAM's queue knows a sample's own keys."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") >> 1
                         for i in ids], dtype=torch.long)


def build_clip(cfg: ClipConfig, tokenizer, load_weights: bool = True) -> nn.Module:
    """HF ``CLIPModel`` or open_clip ``CLIP`` (``open_clip:ARCH[/TAG]``); frozen by the caller, read through
    :func:`~mmsenti.backbones.clip.clip_adapter`. 'tiny-random' (and a random HF CLIP without tokenizer files)
    reads the main tokenizer's ids; open_clip always reads its own tokenizer (it ships with the package)."""
    from transformers import CLIPConfig, CLIPModel

    if cfg.name == "tiny-random":
        hf = CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.width, intermediate_size=4 * cfg.width,
                             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                             max_position_embeddings=max(64, tokenizer.model_max_length or 64),
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                             eos_token_id=tokenizer.sep_token_id),
            vision_config=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                               intermediate_size=4 * cfg.width, num_hidden_layers=cfg.num_layers,
                               num_attention_heads=cfg.num_heads),
            projection_dim=cfg.projection_dim,
        )
        return CLIPModel(hf)
    from mmsenti.backbones import clip_preset, load_clip

    arch = dict(cfg.arch)
    if not cfg.pretrained and clip_preset(cfg.name).impl == "hf":
        # random init without tokenizer files reads the main tokenizer's ids (see build_processor)
        text = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        arch = merge({"text_config": text}, arch)
    model, _, _ = load_clip(cfg.name, cfg.pretrained, config=arch or None, load_weights=load_weights,
                            config_key="model.clip.pretrained")
    return model


class Infig(MultimodalModel):
    """INFIG. Built with ``inference=True`` it holds only what ``forward`` reads in eval mode: no momentum
    encoders, queues, CLIP or alignment losses (see :meth:`training_only_modules`)."""

    backbone_prefixes = ("text_encoder.backbone.", "image_encoder.backbone.")

    def __init__(self, cfg: InfigConfig, info: TaskInfo, processor, load_weights: bool = True,
                 inference: bool = False):
        super().__init__(cfg, info, inference)
        self._validate(cfg)
        d = cfg.width
        self.has_text, self.has_image = "text" in cfg.modalities, "image" in cfg.modalities
        both = self.has_text and self.has_image
        # The alignment modules relate the two modalities: with one modality INFIG is its encoder + fusion.
        self.use_gam, self.use_hfam = cfg.use_gam and both, cfg.use_hfam and both
        if not both and (cfg.use_gam or cfg.use_hfam):
            log.info("infig with modalities %s: GAM and HFAM need both modalities and are not built", cfg.modalities)
        self.use_clip = cfg.clip_active and both
        self.text_encoder = self.text_proj = self.image_encoder = None
        need = max(cfg.hfam_layers if self.use_hfam else 1, cfg.gam_layer if self.use_gam else 1)
        if self.has_text:
            self.text_encoder = build_text_encoder(cfg.text_encoder, processor.tokenizer, load_weights)
            n = self.text_encoder.num_layers
            # Only the states some module reads (lets the frozen-feature cache store just those).
            self.text_encoder.needed_states = set(range(n + 1 - need, n + 1))
            self.text_proj = nn.Linear(self.text_encoder.width, d) if self.text_encoder.width != d else nn.Identity()
        if self.has_image:
            cnn = build_image_encoder(cfg.image_encoder, load_weights, text=cfg.text_encoder, processor=processor)
            size = processor.image_transform.size if cnn.regions else None
            self.image_encoder = ImageTransformerEncoder(cnn, d, cfg.image_layers, cfg.image_heads, size,
                                                         cfg.dropout, cfg.attention)
        for name, enc in (("text_encoder", self.text_encoder), ("image_layers", self.image_encoder)):
            if enc is not None and enc.num_layers < need:
                raise ConfigError(f"model: {name} has {enc.num_layers} layers, but hfam_layers/gam_layer need {need}")

        if cfg.use_clip and cfg.image_encoder.name == "tags" and both:
            log.info("use_clip with a tags image encoder: CLIP reads the image itself, so it is not built (w/o CLIP)")
        if cfg.use_clip and not cfg.use_gam:
            log.info("use_clip without use_gam: CLIP only feeds GAM, so it is not built")
        if self.use_gam and not inference:
            g_dim = d
            if self.use_clip:
                from mmsenti.backbones.clip import clip_adapter

                self.clip = build_clip(cfg.clip, processor.tokenizer, load_weights).requires_grad_(False).eval()
                self.clip_api = clip_adapter(self.clip)  # a view of self.clip: adds no state
                proj_dim = self.clip_api.projection_dim
                self.clip_image_proj = nn.Linear(proj_dim, cfg.clip_dim)
                self.clip_text_proj = nn.Linear(proj_dim, cfg.clip_dim)
                g_dim += cfg.clip_dim
            # Momentum copies of everything that produces a global feature (the frozen CLIP needs none).
            for name in self._training_momentum_names():
                setattr(self, f"{name}_m", make_momentum_copy(getattr(self, name)))
            self.gam_loss = GlobalAlignmentLoss(g_dim, cfg.queue_size, cfg.temperature)
        if self.use_hfam and not inference:
            self.hfam_loss = FineGrainedAlignmentLoss(cfg.top_j, cfg.hfam_chunk_size)
            self.hfam_temperature = LearnableTemperature(cfg.temperature)

        self.type_embed = nn.Parameter(torch.zeros(2, d))  # image / text token types in the fusion sequence
        self.fusion = nn.ModuleList(TransformerBlock(d, cfg.fusion_heads, dropout=cfg.dropout, attention=cfg.attention)
                                    for _ in range(cfg.fusion_layers))
        self.fusion_norm = nn.LayerNorm(d)
        self.pool = AttentionPool(d)
        self.proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout))
        self.classifier = nn.Linear(d, info.num_outputs)

    @staticmethod
    def _validate(cfg: InfigConfig) -> None:
        if not cfg.modalities or set(cfg.modalities) - {"image", "text"} or len(set(cfg.modalities)) != len(cfg.modalities):
            raise ConfigError(f"model.modalities: infig reads text and/or image, got {cfg.modalities}")
        for key in ("gam_layer", "hfam_layers", "top_j", "queue_size", "fusion_layers", "image_layers"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {getattr(cfg, key)}")
        if not 0.0 <= cfg.momentum < 1.0:
            raise ConfigError(f"model.momentum: must be in [0, 1), got {cfg.momentum}")
        if not 0.0 <= cfg.modality_dropout <= 1.0:
            raise ConfigError(f"model.modality_dropout: must be in [0, 1], got {cfg.modality_dropout}")

    def training_only_modules(self) -> tuple[str, ...]:
        names = []
        if self.use_gam:
            names += [*(f"{n}_m" for n in self._training_momentum_names()), "gam_loss"]
            names += ["clip", "clip_image_proj", "clip_text_proj"] if self.use_clip else []
        if self.use_hfam:
            names += ["hfam_loss", "hfam_temperature"]
        return tuple(names)

    def _training_momentum_names(self) -> list[str]:
        return ["text_encoder", "text_proj", "image_encoder"] + (
            ["clip_image_proj", "clip_text_proj"] if self.use_clip else [])

    @property
    def supports_missing_modality(self) -> bool:
        """Fusion can hide a modality (``image_present`` / ``text_present``); meaningful when trained with
        ``modality_dropout``."""
        return self.has_text and self.has_image

    # ------------------------------------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Infig:
        super().train(mode)
        if self.use_clip and not self.inference:
            self.clip.eval()  # frozen prior: no dropout, fixed statistics
        return self

    def no_weight_decay(self) -> set[str]:
        return {"type_embed", "image_encoder.cls_token", "image_encoder.pos_embed"}

    # -------------------------------------------------------------------------------------------- encoders
    def _encode(self, batch: dict, suffix: str = "") -> tuple[list | None, list | None, torch.Tensor | None,
                                                               torch.Tensor | None]:
        """Image and (projected) text hidden states, every layer, the text mask and the image tokens' mask (tags:
        padding; None when every image token is real); suffix '_m' uses the momentum encoders."""
        img_states = txt_states = mask = img_mask = None
        if self.has_text:
            text_enc, text_proj = getattr(self, "text_encoder" + suffix), getattr(self, "text_proj" + suffix)
            txt = text_enc.encode_batch(batch)
            mask = txt.attention_mask
            need = len(text_enc.needed_states)  # only states some module reads are projected
            txt_states = [None] * (len(txt.hidden_states) - need) + [text_proj(h) for h in txt.hidden_states[-need:]]
        if self.has_image:
            img = getattr(self, "image_encoder" + suffix).encode_batch(batch)
            img_states, img_mask = list(img.hidden_states), img.attention_mask
        return img_states, txt_states, mask, img_mask

    def _global_features(self, img_states, txt_states, clip_feats, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        k = self.config.gam_layer
        i_g, t_g = img_states[-k][:, 0], txt_states[-k][:, 0]
        if self.use_clip:
            i_clip, t_clip = clip_feats
            i_g = torch.cat([i_g, getattr(self, "clip_image_proj" + suffix)(i_clip)], dim=-1)
            t_g = torch.cat([t_g, getattr(self, "clip_text_proj" + suffix)(t_clip)], dim=-1)
        return i_g, t_g

    # CLIP is frozen: its embeddings can come from the frozen-feature cache.
    _CLIP_KEYS = ("cached_clip_image", "cached_clip_text")

    def cache_spec(self) -> dict[str, str]:
        spec = super().cache_spec()
        if self.use_clip and not self.inference:
            spec.update(dict.fromkeys(self._CLIP_KEYS, "fixed"))
        return spec

    def cache_replaces(self) -> set[str]:
        extra = ({"clip_pixel_values", "clip_input_ids", "clip_attention_mask"}
                 if self.use_clip and not self.inference else set())
        return super().cache_replaces() | extra

    def cache_modules(self) -> dict[str, nn.Module]:
        return {**super().cache_modules(), **({"clip": self.clip} if self.use_clip and not self.inference else {})}

    @torch.no_grad()
    def compute_cached(self, batch: dict) -> dict[str, torch.Tensor]:
        out = super().compute_cached(batch)
        if self.use_clip and not self.inference:
            out.update(zip(self._CLIP_KEYS, self._clip_features(batch), strict=True))
        return out

    @torch.no_grad()
    def _clip_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if all(k in batch for k in self._CLIP_KEYS):
            return batch[self._CLIP_KEYS[0]], batch[self._CLIP_KEYS[1]]
        return (self.clip_api.image_features(batch["clip_pixel_values"]),
                self.clip_api.text_features(batch["clip_input_ids"], batch["clip_attention_mask"]))

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, return_attention: bool = False, return_tokens: bool = False) -> dict:
        """Logits (and, in training, the alignment losses' inputs).

        Args:
            return_attention: also return every fusion layer's attention (``attentions``, a list of
                (B, heads, L, L); ``attention`` is the last one), the attention-pooling weights (``pool_weights``,
                (B, L)), ``num_image_tokens`` (image [CLS] + regions, first in the fusion sequence) and
                ``image_grid`` (rows, cols) of the regions, for explanations.
            return_tokens: also return HFAM's token states (``hfam_tokens``: image layers, text layers, text mask,
                [CLS] removed, the last ``hfam_layers`` layers, as the fine-grained loss reads them), in any mode.
        """
        img_states, txt_states, mask, img_mask = self._encode(batch)
        parts, pads = [], []
        if img_states is not None:
            img_tok = img_states[-1]
            parts.append(img_tok + self.type_embed[0])
            pads.append(torch.zeros(img_tok.shape[:2], dtype=torch.bool, device=img_tok.device)
                        if img_mask is None else img_mask == 0)
        if txt_states is not None:
            parts.append(txt_states[-1] + self.type_embed[1])
            pads.append(mask == 0)
        if self.training and len(parts) == 2 and self.config.modality_dropout > 0:
            drop = modality_drop(pads[0].shape[0], self.config.modality_dropout, pads[0].device)
            pads = [pads[0] | drop[:, :1], pads[1] | drop[:, 1:]]
        if len(parts) == 2 and ("image_present" in batch or "text_present" in batch):
            # A post served without one modality (``--allow-missing-modality``): hidden as modality dropout does.
            for i, key in enumerate(("image_present", "text_present")):
                if key in batch:
                    pads[i] = pads[i] | ~batch[key].to(pads[i].device)[:, None]
        x, pad = torch.cat(parts, dim=1), torch.cat(pads, dim=1)
        attns = []
        for block in self.fusion:
            x, w = block(x, key_padding_mask=pad, need_weights=return_attention)
            if w is not None:
                attns.append(w)
        pooled, pool_weights = self.pool(self.fusion_norm(x), pad)
        out = {"logits": self.classifier(self.proj(pooled)), "pooled": pooled}
        if return_attention:
            out.update(attention=attns[-1], attentions=attns, pool_weights=pool_weights,
                       num_image_tokens=img_states[-1].shape[1] if img_states is not None else 0,
                       image_grid=self.image_encoder.grid_size if self.has_image else None)
        if return_tokens and self.use_hfam:
            out["hfam_tokens"] = self._hfam_tokens(img_states, txt_states, mask, img_mask)

        if self.training and (self.use_gam or self.use_hfam):
            self._check_trainable()
        if self.training and self.use_gam:
            clip_feats = self._clip_features(batch) if self.use_clip else None
            out["global"] = self._global_features(img_states, txt_states, clip_feats)
            with torch.no_grad():  # the momentum encoders move once per optimiser step (on_optimizer_step)
                img_m, txt_m, _, _ = self._encode(batch, "_m")
                out["global_m"] = self._global_features(img_m, txt_m, clip_feats, "_m")
            out["sample_index"] = stable_sample_index(batch["ids"]).to(x.device)
        if self.training and self.use_hfam:
            out["fine"] = self._hfam_tokens(img_states, txt_states, mask, img_mask)
        return out

    @torch.no_grad()
    def explain_forward(self, batch: dict, options: Any) -> Explained:
        """Also the word → region maps' inputs when the post has both modalities: the fusion attention and pooling
        weights, and HFAM's token similarity at layer ``options.hfam_layer`` from the end."""
        out = self(batch, return_attention=True, return_tokens=True)
        present = all(bool(batch[k][0]) for k in ("image_present", "text_present") if k in batch)
        if not (self.has_text and self.has_image and present):
            return Explained(out)
        grid = tuple(out["image_grid"]) if out["image_grid"] is not None else None  # None: tags, no grid
        maps = WordRegions(grid, int(out["num_image_tokens"]),
                           [a[0] for a in out["attentions"]], out["pool_weights"][0])
        if "hfam_tokens" in out:
            img_layers, txt_layers, mask, img_mask = out["hfam_tokens"]
            k = options.hfam_layer
            if k > len(img_layers):
                raise ValueError(f"hfam_layer {k}: this model aligns its last {len(img_layers)} layers "
                                 "(model.hfam_layers)")
            maps.similarity = token_similarity(img_layers[-k], txt_layers[-k], mask, img_mask)[0]
            maps.similarity_title = (f"HFAM token similarity (cosine), "
                                     f"{'last layer' if k == 1 else f'layer {k} from the end'}")
        else:
            maps.notes.append("this INFIG was built without HFAM (use_hfam: false): no similarity map")
        return Explained(out, word_regions=maps)

    def _hfam_tokens(self, img_states, txt_states, mask, img_mask) -> tuple[list, list, torch.Tensor,
                                                                            torch.Tensor | None]:
        """What HFAM aligns: the last ``hfam_layers`` layers' tokens. [CLS] (position 0) excluded on both sides;
        text padding excluded by the mask."""
        m = self.config.hfam_layers
        img_mask = None if img_mask is None else img_mask[:, 1:]
        return [h[:, 1:] for h in img_states[-m:]], [h[:, 1:] for h in txt_states[-m:]], mask[:, 1:], img_mask

    @torch.no_grad()
    def update_momentum_encoders(self) -> None:
        """One EMA step of the momentum encoders towards the online ones (a no-op without GAM).

        The trainer calls it once per optimiser step (:meth:`on_optimizer_step`), not once per forward: with
        gradient accumulation over k micro-batches a per-forward update would apply the EMA k times to the same
        weights (an effective momentum of m^k). A custom training loop calls it after each ``optimizer.step()``.
        """
        if self.use_gam and not self.inference:
            for name in self._training_momentum_names():
                momentum_update(getattr(self, name), getattr(self, name + "_m"), self.config.momentum)

    def on_optimizer_step(self, trainer=None) -> None:
        self.update_momentum_encoders()

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        """L_sc always; λg·L_g and λf·L_f in training (their inputs exist only in training mode)."""
        terms = dict(self.criterion(outputs, batch))
        if "global" in outputs:
            (i_g, t_g), (i_m, t_m) = outputs["global"], outputs["global_m"]
            g = self.gam_loss(i_g, t_g, i_m, t_m, ids=outputs["sample_index"])
            terms["loss_g"] = self.config.lambda_g * g["loss_g"]
            terms["tau_g"] = g["tau"]
        if "fine" in outputs:
            img, txt, mask, img_mask = outputs["fine"]
            f = self.hfam_loss(img, txt, mask, self.hfam_temperature(), img_mask=img_mask)
            terms["loss_f"] = self.config.lambda_f * f["loss_f"]
        return terms


@MODELS.register("infig", config=InfigConfig,
                 description="INFIG: CLIP-assisted global + hierarchical fine-grained alignment, transformer fusion")
def infig(cfg: InfigConfig, info: TaskInfo, processor, load_weights: bool = True, inference: bool = False) -> Infig:
    return Infig(cfg, info, processor, load_weights, inference)


# Tiny variant (tests, CPU smoke runs): one layer everywhere, a small GAM queue.
register_tiny("infig", width=32, image_layers=1, image_heads=2, fusion_layers=1, fusion_heads=2, hfam_layers=1,
              clip_dim=16, queue_size=16)
