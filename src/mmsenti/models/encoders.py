"""The encoder interface every model builds on.

A text encoder returns **all layers' hidden states** and its attention mask; an image encoder returns a
**sequence of patch/region tokens per layer**. Fusion models (late fusion, INFIG, rahp) read only this
interface, so a backbone swap (tiny BERT → DeBERTa-v3, small CNN → ResNet-50) changes no model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmsenti.config import ImageEncoderConfig, TextEncoderConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class EncoderOutput:
    """Per-layer token sequences of one modality.

    Attributes:
        hidden_states: one (B, L_l, D_l) tensor per layer, lowest first. For HF text models index 0 is the
            embedding output, as in ``transformers``.
        attention_mask: (B, L) with 1 for real tokens, or None when every token is real (images).
        feature_map: the last (B, C, H, W) map of a CNN, when there is one.
    """

    hidden_states: tuple[torch.Tensor, ...]
    attention_mask: torch.Tensor | None = None
    feature_map: torch.Tensor | None = None

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return self.hidden_states[-1]

    def mean_pool(self, layer: int = -1) -> torch.Tensor:
        """Average of the real tokens of one layer: (B, D)."""
        h = self.hidden_states[layer]
        if self.attention_mask is None:
            return h.mean(dim=1)
        m = self.attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """A Hugging Face encoder (BERT, DeBERTa-v2/v3, MiniLM, ...) exposed through :class:`EncoderOutput`."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.backbone = hf_model
        self.width: int = hf_model.config.hidden_size
        self.num_layers: int = hf_model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                            return_dict=True)
        return EncoderOutput(hidden_states=tuple(out.hidden_states), attention_mask=attention_mask)

    def encode_batch(self, batch: dict) -> EncoderOutput:
        """Encode a collated batch (reads the frozen-feature cache's entries when the batch has them)."""
        return self(batch["input_ids"], batch["attention_mask"])


class ImageEncoder(nn.Module):
    """Base for image encoders: ``forward(pixel_values) -> EncoderOutput`` with one token sequence per stage."""

    width: int  # channels of the last stage's tokens
    num_layers: int

    def encode_batch(self, batch: dict) -> EncoderOutput:
        """Encode a collated batch (reads the frozen-feature cache's entries when the batch has them)."""
        return self(batch["pixel_values"])


class SmallCNN(ImageEncoder):
    """A small from-scratch CNN: ``num_stages`` conv-BN-ReLU-maxpool stages, each halving the resolution.

    Each stage's map is also returned flattened to (B, H·W, C) tokens, so region-level models (INFIG) can use
    it like any backbone's feature map.
    """

    def __init__(self, width: int = 32, num_stages: int = 4, in_chans: int = 3):
        super().__init__()
        stages = []
        c_in = in_chans
        for i in range(num_stages):
            c_out = width * 2**i
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.width = c_in
        self.num_layers = num_stages

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        x = pixel_values
        tokens = []
        for stage in self.stages:
            x = stage(x)
            tokens.append(x.flatten(2).transpose(1, 2))
        return EncoderOutput(hidden_states=tuple(tokens), feature_map=x)


def build_text_encoder(cfg: TextEncoderConfig, tokenizer, load_weights: bool = True) -> TextEncoder:
    """Build the configured text encoder.

    Args:
        cfg: the encoder's config.
        tokenizer: the tokenizer it will read (its vocabulary sizes the embedding of from-scratch models).
        load_weights: False when the caller is about to load a saved checkpoint (skip pretrained downloads).
    """
    if cfg.name == "tiny-bert":
        from transformers import BertConfig, BertModel

        hf_cfg = BertConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.width, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=4 * cfg.width,
            max_position_embeddings=max(64, cfg.max_length), pad_token_id=tokenizer.pad_token_id,
        )
        return TextEncoder(BertModel(hf_cfg, add_pooling_layer=False))
    raise ValueError(f"unknown text encoder '{cfg.name}'")


def build_image_encoder(cfg: ImageEncoderConfig, load_weights: bool = True) -> ImageEncoder:
    if cfg.name == "small-cnn":
        return SmallCNN(width=cfg.width, num_stages=cfg.num_stages)
    raise ValueError(f"unknown image encoder '{cfg.name}'")


def build_processor(cfg, train_texts, task: str):
    """The preprocessing that matches ``cfg`` (a ModelConfig): tokenizer and image transform.

    From-scratch text encoders learn their word-piece vocabulary on ``train_texts`` here; the result is saved
    with the model so prediction tokenizes exactly as training did.
    """
    from mmsenti.data.processing import ImageTransform, Processor, train_wordpiece_tokenizer

    tokenizer = None
    if "text" in cfg.modalities:
        tc = cfg.text_encoder
        if tc.name == "tiny-bert":
            tokenizer = train_wordpiece_tokenizer(train_texts, tc.vocab_size, tc.max_length)
        else:
            raise ValueError(f"unknown text encoder '{tc.name}'")
    transform = None
    if "image" in cfg.modalities:
        ic = cfg.image_encoder
        transform = ImageTransform(size=ic.image_size, mean=list(ic.mean), std=list(ic.std))
    clip_tokenizer = clip_transform = None
    if getattr(cfg, "clip_active", False):
        if cfg.clip.name == "tiny-random":  # a random stand-in reads the main tokenizer's ids
            clip_tokenizer = tokenizer
            clip_transform = ImageTransform(size=cfg.clip.image_size, mean=list(CLIP_MEAN), std=list(CLIP_STD),
                                            resize="shorter", interpolation="bicubic")
        else:
            from mmsenti.backbones import clip_preprocessing

            clip_tokenizer, clip_transform = clip_preprocessing(cfg.clip.name, cfg.clip.pretrained)
    return Processor(cfg.modalities, tokenizer, cfg.text_encoder.max_length, transform, task,
                     clip_tokenizer, clip_transform)


class ImageTransformerEncoder(ImageEncoder):
    """CNN feature map → linear projection to ``width`` → [CLS] + position embeddings → transformer layers.

    INFIG's image encoder. ``hidden_states[0]`` is the projected input (like an HF embedding output) and
    ``hidden_states[i]`` the output of transformer layer i, each (B, 1 + H·W, width) with [CLS] first.
    """

    def __init__(self, backbone: ImageEncoder, width: int, num_layers: int, num_heads: int, image_size: int,
                 dropout: float = 0.1):
        super().__init__()
        from mmsenti.models.layers import TransformerBlock

        self.backbone = backbone
        num_tokens = self._num_regions(backbone, image_size)
        self.proj = nn.Linear(backbone.width, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, num_heads, dropout=dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.width = width
        self.num_layers = num_layers

    @staticmethod
    def _num_regions(backbone: ImageEncoder, image_size: int) -> int:
        was_training = backbone.training
        backbone.eval()  # a dummy pass must not move batch-norm statistics
        with torch.no_grad():
            fmap = backbone(torch.zeros(1, 3, image_size, image_size)).feature_map
        backbone.train(was_training)
        return fmap.shape[-2] * fmap.shape[-1]

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        fmap = self.backbone(pixel_values).feature_map
        x = self.proj(fmap.flatten(2).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"image gives {x.shape[1] - 1} regions, the encoder was built for "
                             f"{self.pos_embed.shape[1] - 1}: images must be resized to the configured image_size")
        x = x + self.pos_embed
        states = [x]
        for i, block in enumerate(self.blocks):
            x, _ = block(x)
            states.append(self.norm(x) if i == len(self.blocks) - 1 else x)
        return EncoderOutput(hidden_states=tuple(states), feature_map=fmap)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}
