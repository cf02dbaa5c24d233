"""Build backbones from presets: architecture first, then (separately) strictly loaded pretrained weights.

``pretrained`` is the same everywhere:

* ``True``: the preset's weights, found by :func:`~mmsenti.backbones.weights.resolve_weights` (offline package,
  ``$MMSENTI_WEIGHTS_DIR``, hub cache, hub download when online);
* a path (file or directory): exactly those weights; a string that is not a path (``org/model``) is a hub id;
* ``False`` / ``None``: random initialisation of the same architecture, with no download. ``config`` then
  shrinks or replaces the architecture (tiny stand-ins for tests).

Every model is returned in eval mode, in float32.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mmsenti.backbones.presets import (
    BackbonePreset,
    ClipPreset,
    ImagePreset,
    TextPreset,
    clip_preset,
    image_preset,
    text_preset,
)
from mmsenti.backbones.remap import load_state_dict_strict, to_timm_layout
from mmsenti.backbones.weights import (
    ENV_WEIGHTS_DIR,
    MissingWeightsError,
    ResolvedWeights,
    WeightsError,
    read_state_dict,
    resolve_weights,
)
from mmsenti.compat import ensure_torchvision_importable, import_open_clip, import_timm
from mmsenti.config import merge

log = logging.getLogger(__name__)

Pretrained = str | os.PathLike | bool | None

_DEFAULT_KEYS = {
    "text": "model.text_encoder.pretrained", "image": "model.image_encoder.pretrained", "clip": "model.clip.pretrained",
}
_TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "config.json")
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def resolve_backbone_weights(
    preset: BackbonePreset | str,
    pretrained: Pretrained = True,
    *,
    kind: str | None = None,
    config_key: str | None = None,
    download: bool = True,
) -> ResolvedWeights | None:
    """Where a backbone's weights are, or None for random initialisation (``pretrained`` False/None).

    Args:
        preset: a preset, or a name looked up as ``kind`` (``"text"``, ``"image"`` or ``"clip"``).
        pretrained: see the module docstring.
        kind: the kind of backbone a name stands for (required when ``preset`` is a string).
        config_key: the config field named in errors (default: ``model.<kind>_encoder.pretrained``).
        download: allow a hub download when online.

    Raises:
        MissingWeightsError: weights asked for but not found (one message saying how to provide them).
    """
    if isinstance(preset, str):
        lookup = {"text": text_preset, "image": image_preset, "clip": clip_preset}
        if kind not in lookup:
            raise ValueError(f"kind must be one of {', '.join(lookup)} when a name is given, got {kind!r}")
        preset = lookup[kind](preset)
    if pretrained is False or pretrained is None:
        return None
    explicit = None if pretrained is True else pretrained
    key = config_key or _DEFAULT_KEYS[preset.kind]
    if isinstance(preset, TextPreset):
        if preset.hf_id is None and explicit is None:  # a local model directory given as the name
            explicit = preset.name
        return resolve_weights(preset.name, explicit, package=preset.offline_package, hub_id=preset.hf_id,
                               config_key=key, download=download)
    if isinstance(preset, ImagePreset):
        return resolve_weights(preset.name, explicit, package=preset.offline_package, hub_id=preset.hf_id,
                               hub_files=_TIMM_HUB_FILES, config_key=key, download=download)
    if preset.impl == "hf":
        return resolve_weights(preset.name, explicit, hub_id=preset.model_id, config_key=key, download=download)
    hub_id = _open_clip_hub_id(preset)
    if hub_id is None and explicit is None:
        raise MissingWeightsError(
            f"open_clip has no hub copy of {preset.model_id}/{preset.tag}; set {key}=/path/to/checkpoint"
        )
    return resolve_weights(preset.name, explicit, hub_id=hub_id, hub_files=_OPEN_CLIP_FILES + ("*.json",),
                           config_key=key, download=download)


def _local_weights(preset: BackbonePreset, pretrained: Pretrained = True) -> ResolvedWeights | None:
    """The weights ``pretrained`` stands for if they are on this machine already (never downloads), else None."""
    if pretrained is False or pretrained is None:
        pretrained = True
    try:
        return resolve_backbone_weights(preset, pretrained, download=False)
    except MissingWeightsError:
        return None


def _is_random(pretrained: Pretrained, load_weights: bool) -> bool:
    return not load_weights or pretrained is False or pretrained is None


# ------------------------------------------------------------------------------------------------ text
def _base_model_class(hf_config) -> type:
    from transformers import AutoModel

    return AutoModel._model_mapping[type(hf_config)]


def _no_pooler_kwargs(model_cls: type) -> dict[str, Any]:
    # BERT-like models add a pooler (CLS → dense → tanh) that no mmsenti model reads; leaving it out keeps every
    # parameter trained (no unused-parameter surprises under DDP, no dead weights in the optimiser).
    import inspect

    params = inspect.signature(model_cls.__init__).parameters
    return {"add_pooling_layer": False} if "add_pooling_layer" in params else {}


def _text_config(preset: TextPreset, config: Any, local: ResolvedWeights | None):
    """The architecture: ``config`` itself if it is a ``PretrainedConfig``; else the local weights'
    config.json, or failing that the preset's built-in architecture, with the dict ``config``'s overrides."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if local is not None and (local.path / "config.json").is_file():
        hf_config = AutoConfig.from_pretrained(local.path, local_files_only=True)
    elif preset.arch is not None:
        arch = dict(preset.arch)
        hf_config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    else:
        raise MissingWeightsError(
            f"the architecture of text backbone '{preset.name}' is unknown offline: give a config, or its model "
            f"directory (config.json) via model.text_encoder.pretrained or ${ENV_WEIGHTS_DIR}"
        )
    for k, v in (config or {}).items():
        setattr(hf_config, k, v)
    return hf_config


def load_text_backbone(
    name: str,
    pretrained: Pretrained = True,
    *,
    config: Any = None,
    load_weights: bool = True,
    config_key: str | None = None,
    download: bool = True,
):
    """A Hugging Face encoder (no task head, no pooler) and its tokenizer.

    Random initialisation takes the architecture from ``config``, else from the weights' config.json when it is
    on this machine, else from the preset.

    Args:
        name: a text preset (``deberta-v3-base``, ``bert-base-uncased``, ``minilm-l6``), a Hugging Face id or a
            local model directory.
        pretrained: see the module docstring.
        config: a ``PretrainedConfig`` to build instead of the preset's architecture, or a dict of attribute
            overrides (e.g. ``{"hidden_size": 32, "num_hidden_layers": 2}`` for a tiny random stand-in, or
            ``{"hidden_dropout_prob": 0.0}`` with pretrained weights).
        load_weights: False builds the architecture only (random init, no download), for callers about to load
            a saved checkpoint.
        config_key: the config field named in errors.
        download: allow a hub download when online.

    Returns:
        ``(model, tokenizer)``: a ``transformers.PreTrainedModel`` whose ``forward(...,
        output_hidden_states=True)`` gives every layer's states, and its tokenizer with ``model_max_length`` set
        to the preset's ``max_length``. With random initialisation the tokenizer comes from local files when
        there are any, else it is None (its vocabulary may then exceed a shrunken ``vocab_size``).

    Raises:
        MissingWeightsError: weights asked for but not available.
        WeightsError: weights that do not fit the architecture (missing or mis-shaped tensors).
    """
    ensure_torchvision_importable()  # transformers imports torchvision when it is installed
    from transformers import AutoModel

    preset = text_preset(name)
    if _is_random(pretrained, load_weights):
        local = _local_weights(preset, pretrained)
        hf_config = _text_config(preset, config, local)
        model = AutoModel.from_config(hf_config, **_no_pooler_kwargs(_base_model_class(hf_config)))
        tokenizer = _load_tokenizer(local.path, preset) if local is not None and local.path.is_dir() else None
        return model.float().eval(), tokenizer

    weights = resolve_backbone_weights(preset, pretrained, config_key=config_key, download=download)
    assert weights is not None
    if not weights.path.is_dir():
        raise WeightsError(f"text weights must be a model directory (config.json, weights, tokenizer files), "
                           f"got the file {weights.path}")
    hf_config = _text_config(preset, config, weights)
    model = _hf_from_pretrained(AutoModel, weights.path, f"{preset.name} weights from {weights.path}",
                                config=hf_config, **_no_pooler_kwargs(_base_model_class(hf_config)))
    return model.eval(), _load_tokenizer(weights.path, preset)


def load_tokenizer(name: str, pretrained: Pretrained = True, *, config_key: str | None = None,
                   download: bool = True):
    """Just the tokenizer of a text backbone (its files only; no model is built).

    Raises:
        MissingWeightsError: the backbone's files are not available.
    """
    ensure_torchvision_importable()
    preset = text_preset(name)
    weights = resolve_backbone_weights(preset, True if pretrained in (False, None) else pretrained,
                                       config_key=config_key, download=download)
    assert weights is not None
    return _load_tokenizer(weights.path, preset)


def _load_tokenizer(path, preset: TextPreset | ClipPreset):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any tokenizer problem is a weights-directory problem for the user
        raise WeightsError(f"cannot load the tokenizer of '{preset.name}' from {path} ({type(e).__name__}: "
                           f"{str(e).strip()[:200]})") from None
    tokenizer.model_max_length = preset.max_length
    return tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own load report and progress bar: :func:`_check_hf_loading` judges the result."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _hf_from_pretrained(model_cls: type, path, what: str, **kwargs: Any):
    """``model_cls.from_pretrained(path)`` from local files, float32, strict (see :func:`_check_hf_loading`)."""
    try:
        with _quiet_transformers():
            model, info = model_cls.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                    output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:  # unreadable files, size mismatches (raised by transformers)
        raise WeightsError(f"{what} cannot be loaded ({type(e).__name__}: {str(e).strip()[:300]})") from None
    _check_hf_loading(info, what)
    return model


def _check_hf_loading(info: dict[str, Any], what: str) -> None:
    """Strict loading for transformers: every model tensor must come from the checkpoint with its shape.

    Unexpected checkpoint keys are allowed: they are the task heads (MLM, pooler) a bare encoder leaves out.
    """
    problems = []
    if info.get("missing_keys"):
        keys = sorted(info["missing_keys"])
        problems.append(f"missing: {', '.join(keys[:4])}" + (f", ... ({len(keys)} in all)" if len(keys) > 4 else ""))
    if info.get("mismatched_keys"):
        items = [f"{m[0]}" if isinstance(m, (tuple, list)) else str(m) for m in info["mismatched_keys"]]
        problems.append(f"wrong shape: {', '.join(items[:4])}")
    if problems:
        raise WeightsError(f"{what} do not fit the model ({'; '.join(problems)})")
    if info.get("unexpected_keys"):
        log.debug("%s: unused checkpoint tensors %s", what, sorted(info["unexpected_keys"])[:8])


# ------------------------------------------------------------------------------------------------ image
def load_image_backbone(
    name: str,
    pretrained: Pretrained = True,
    *,
    keep_classifier: bool = False,
    load_weights: bool = True,
    config_key: str | None = None,
    download: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model usable as a CNN feature-map extractor.

    ``model.forward_features(x)`` gives the last (B, C, H, W) feature map (C = ``model.num_features``);
    ``model.forward_intermediates`` / ``timm``'s ``features_only`` give earlier stages.

    Args:
        name: an image preset (``resnet50``, ``efficientnet_lite0``, ``mobilenetv2_100``) or any timm name.
        pretrained: see the module docstring. Checkpoints in a foreign layout (the EfficientNet-Lite0 package,
            torchvision's MobileNetV2) are remapped onto timm's keys.
        keep_classifier: keep the ImageNet classifier (``model(x)`` → 1000 logits); by default it is removed
            after loading, so ``model(x)`` gives pooled features.
        load_weights: False builds the architecture only (random init, no download).
        config_key: the config field named in errors.
        download: allow a hub download when online.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Raises:
        MissingWeightsError: weights asked for but not available.
        WeightsError: weights that do not fit the architecture.
    """
    timm = import_timm()
    preset = image_preset(name)
    weights = None
    if not _is_random(pretrained, load_weights):
        weights = resolve_backbone_weights(preset, pretrained, config_key=config_key, download=download)
    model = timm.create_model(preset.timm_name, pretrained=False, **timm_kwargs)
    if weights is not None:
        state_dict = to_timm_layout(read_state_dict(weights.path), model)
        load_state_dict_strict(model, state_dict, f"{preset.name} weights from {weights.path}")
    if not keep_classifier:
        model.reset_classifier(0)
    return model.float().eval()


# ------------------------------------------------------------------------------------------------ CLIP
def _open_clip_hub_id(preset: ClipPreset) -> str | None:
    if not preset.tag:
        return None
    open_clip = import_open_clip()
    hub = (open_clip.get_pretrained_cfg(preset.model_id, preset.tag) or {}).get("hf_hub", "")
    parts = [p for p in hub.split("/") if p]
    return "/".join(parts[:2]) if len(parts) >= 2 else None


def load_clip(
    name: str = "clip-vit-b-32",
    pretrained: Pretrained = True,
    *,
    config: Any = None,
    load_weights: bool = True,
    config_key: str | None = None,
    download: bool = True,
):
    """A CLIP model with its tokenizer and image preprocessing.

    Args:
        name: a CLIP preset (``clip-vit-b-32`` → transformers ``CLIPModel``; ``openclip-vit-b-32``) or
            ``open_clip:ARCH/TAG``.
        pretrained: see the module docstring.
        config: hf: a ``CLIPConfig`` or a (nested) dict of overrides of the architecture
            (``{"text_config": {"hidden_size": 32}, ...}``); open_clip: model-constructor overrides
            (``embed_dim``, ``vision_cfg``, ``text_cfg``).
        load_weights: False builds the architecture only (random init, no download).
        config_key: the config field named in errors.
        download: allow a hub download when online.

    Returns:
        ``(model, tokenizer, transform)``: hf: ``transformers.CLIPModel`` and its tokenizer (None with random
        initialisation when the preset's files are not on this machine); open_clip: its ``CLIP`` model and
        tokenizer. ``transform`` is an :class:`~mmsenti.backbones.transforms.ImageTransform` (PIL → tensor) with the
        preset's preprocessing.

    Raises:
        MissingWeightsError: weights asked for but not available.
        WeightsError: weights that do not fit the architecture.
    """
    preset = clip_preset(name)
    random_init = _is_random(pretrained, load_weights)
    weights = None
    if not random_init:
        weights = resolve_backbone_weights(preset, pretrained, config_key=config_key, download=download)
    transform = preset.preprocessing.transform()
    if preset.impl == "open_clip":
        return (*_load_open_clip(preset, weights, config), transform)

    ensure_torchvision_importable()
    from transformers import CLIPConfig, CLIPModel

    if weights is None:
        local = _local_weights(preset, pretrained)
        if isinstance(config, CLIPConfig):
            hf_config = config
        elif local is not None and (local.path / "config.json").is_file():
            hf_config = CLIPConfig.from_pretrained(local.path, local_files_only=True)
            hf_config = CLIPConfig(**merge(hf_config.to_dict(), config or {}))
        else:
            hf_config = CLIPConfig(**merge(preset.arch or {}, config or {}))
        tokenizer = _load_tokenizer(local.path, preset) if local is not None and local.path.is_dir() else None
        return CLIPModel(hf_config).float().eval(), tokenizer, transform
    if not weights.path.is_dir():
        raise WeightsError(f"CLIP weights must be a model directory (config.json, weights, tokenizer files), "
                           f"got the file {weights.path}")
    kwargs: dict[str, Any] = {}
    if isinstance(config, CLIPConfig):
        kwargs["config"] = config
    model = _hf_from_pretrained(CLIPModel, weights.path, f"{preset.name} weights from {weights.path}", **kwargs)
    return model.eval(), _load_tokenizer(weights.path, preset), transform


def clip_preprocessing(name: str = "clip-vit-b-32", pretrained: Pretrained = True, *, config_key: str | None = None,
                       download: bool = True):
    """A CLIP backbone's ``(tokenizer, transform)`` without building the model.

    With ``pretrained`` False/None the hf tokenizer is looked for locally only and may be None.

    Raises:
        MissingWeightsError: weights (hence the hf tokenizer files) asked for but not available.
    """
    preset = clip_preset(name)
    transform = preset.preprocessing.transform()
    if preset.impl == "open_clip":
        return _open_clip_tokenizer(preset), transform
    ensure_torchvision_importable()
    if pretrained is False or pretrained is None:
        local = _local_weights(preset)
    else:
        local = resolve_backbone_weights(preset, pretrained, config_key=config_key, download=download)
    tokenizer = _load_tokenizer(local.path, preset) if local is not None and local.path.is_dir() else None
    return tokenizer, transform


def _open_clip_tokenizer(preset: ClipPreset):
    open_clip = import_open_clip()
    try:
        return open_clip.get_tokenizer(preset.model_id, context_length=preset.max_length)
    except Exception as e:  # noqa: BLE001 - e.g. an HF tokenizer that would need a download while offline
        log.warning("no tokenizer for open_clip %s (%s)", preset.model_id, e)
        return None


def _load_open_clip(preset: ClipPreset, weights: ResolvedWeights | None, config: Any):
    open_clip = import_open_clip()
    quick_gelu = bool((open_clip.get_pretrained_cfg(preset.model_id, preset.tag) or {}).get("quick_gelu")) \
        if preset.tag else False
    model = open_clip.create_model(preset.model_id, pretrained=None, force_quick_gelu=quick_gelu, **(config or {}))
    if weights is not None:
        from mmsenti.backbones.weights import find_weights_file

        path = find_weights_file(weights.path, prefer=_OPEN_CLIP_FILES)
        try:
            open_clip.load_checkpoint(model, str(path), strict=True)
        except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/KeyError/...; one message for all
            raise WeightsError(f"{preset.name} weights from {path} do not fit the model ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0][:300]})") from None
    return model.float().eval(), _open_clip_tokenizer(preset)
