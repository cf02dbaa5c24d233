"""Pretrained backbones: presets with their preprocessing, offline-first weight resolution, strict loading.

Importing this package is light (no torch model libraries); the loaders import transformers / timm / open_clip
(through :mod:`mmsenti.compat`) when called.
"""

from __future__ import annotations

from mmsenti.backbones.build import (
    clip_preprocessing,
    load_clip,
    load_image_backbone,
    load_text_backbone,
    load_tokenizer,
    resolve_backbone_weights,
)
from mmsenti.backbones.presets import (
    BACKBONES,
    ClipPreset,
    ImagePreprocessing,
    ImagePreset,
    TextPreset,
    clip_preset,
    get_preset,
    image_preset,
    text_preset,
)
from mmsenti.backbones.remap import (
    efficientnet_lite0_to_timm,
    load_state_dict_strict,
    to_timm_layout,
    torchvision_mobilenetv2_to_timm,
)
from mmsenti.backbones.weights import (
    ENV_WEIGHTS_DIR,
    OFFLINE_PACKAGES,
    MissingWeightsError,
    OfflinePackage,
    ResolvedWeights,
    WeightsError,
    file_sha256,
    hub_online,
    read_state_dict,
    resolve_weights,
    weights_fingerprint,
)

__all__ = [
    "BACKBONES", "ClipPreset", "ENV_WEIGHTS_DIR", "ImagePreprocessing", "ImagePreset", "MissingWeightsError",
    "OFFLINE_PACKAGES", "OfflinePackage", "ResolvedWeights", "TextPreset", "WeightsError", "clip_preprocessing",
    "clip_preset", "efficientnet_lite0_to_timm", "file_sha256", "get_preset", "hub_online", "image_preset",
    "load_clip", "load_image_backbone", "load_state_dict_strict", "load_text_backbone", "load_tokenizer",
    "read_state_dict", "resolve_backbone_weights", "resolve_weights", "text_preset", "to_timm_layout",
    "torchvision_mobilenetv2_to_timm", "weights_fingerprint",
]
