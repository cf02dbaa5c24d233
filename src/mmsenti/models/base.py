"""Base class of every mmsenti model, model building, and the saved-model directory format.

A trained model is a directory::

    config.json          the full resolved config (data, model, optim, run) it was trained with
    labels.json          task and label names
    model.safetensors    weights: only what eval-mode ``forward`` reads (training checkpoints keep the rest)
    preprocessing.json   + tokenizer/   what turns raw text/images into inputs
    text_backbone/       the HF config of a pretrained text encoder (its architecture; weights are in the above)
    manifest.json        size and SHA-256 of every file above, verified at load (:mod:`mmsenti.models.files`)
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmsenti.config import Config, ModelConfig
from mmsenti.losses import task_loss
from mmsenti.models.files import ModelFileError, read_config, read_labels, verify_manifest, write_manifest

log = logging.getLogger(__name__)

TEXT_BACKBONE_DIR = "text_backbone"  # saved HF config of a pretrained text encoder


@dataclass
class TaskInfo:
    """What a model needs to know about its data's labels."""

    task: str  # "classification" | "regression"
    label_names: list[str] | None

    @property
    def num_outputs(self) -> int:
        return len(self.label_names) if self.task == "classification" and self.label_names else 1


class MultimodalModel(nn.Module):
    """``forward(batch) -> {"logits": ..., ...}``; ``compute_loss(outputs, batch) -> {"loss_*": ...}``.

    Subclasses set ``backbone_prefixes`` (parameter-name prefixes of pretrained backbones, trained at
    ``optim.backbone_lr``) and may extend ``no_weight_decay`` (names of tokens/embeddings never decayed).

    A model with parts only training reads (momentum encoders, queues, a frozen teacher) names them in
    :meth:`training_only_modules` and does not build them when built with ``inference=True``: the saved model
    (``model.safetensors``) holds only what ``forward`` reads in eval mode, and loads strictly into such a build.
    Training checkpoints keep the whole state.
    """

    backbone_prefixes: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, info: TaskInfo, inference: bool = False):
        super().__init__()
        self.config = cfg
        self.info = info
        self.inference = inference  # built for prediction only (no training-only parts)
        self.criterion = task_loss(info.task, cfg.label_smoothing)

    def training_only_modules(self) -> tuple[str, ...]:
        """Names of submodules that only training reads: left out of the saved model and of an inference build."""
        return ()

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The state ``forward`` reads in eval mode: the state dict without :meth:`training_only_modules`."""
        drop = tuple(f"{name}." for name in self.training_only_modules())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(drop)}

    @property
    def supports_missing_modality(self) -> bool:
        """Whether ``forward`` honours ``image_present`` / ``text_present`` batch masks (a post lacking one)."""
        return False

    def _check_trainable(self) -> None:
        if self.inference:
            raise RuntimeError(f"{type(self).__name__} was built for inference (no training-only parts); "
                               "build it with inference=False to train it")

    def compute_loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.criterion(outputs, batch)

    def no_weight_decay(self) -> set[str]:
        return set()

    # ------------------------------------------------------------------------------ frozen-feature cache
    # A model reads cached features through its encoders' ``encode_batch``; these methods tell the cache what to
    # store. The defaults cover ``self.text_encoder`` / ``self.image_encoder``; models with other frozen parts
    # (INFIG's CLIP) extend them.
    def _cacheable_encoders(self) -> tuple[Any, Any]:
        from mmsenti.models.encoders import ImageEncoder, TextEncoder

        te, ie = getattr(self, "text_encoder", None), getattr(self, "image_encoder", None)
        return (te if isinstance(te, TextEncoder) and te.cacheable else None,
                ie if isinstance(ie, ImageEncoder) and ie.cacheable else None)

    def cache_spec(self) -> dict[str, str]:
        """Batch keys the cache can supply: ``"tokens"`` (one row per real text token) or ``"fixed"`` (per sample)."""
        from mmsenti.models.encoders import IMAGE_MAP_KEY, text_state_key

        te, ie = self._cacheable_encoders()
        spec = {text_state_key(i): "tokens" for i in te.cached_state_indices()} if te is not None else {}
        if ie is not None:
            spec[IMAGE_MAP_KEY] = "fixed"
        return spec

    def cache_replaces(self) -> set[str]:
        """Raw batch inputs that are not needed when the cache supplies the features (images are then not read)."""
        return {"pixel_values"} if self._cacheable_encoders()[1] is not None else set()

    def cache_modules(self) -> dict[str, nn.Module]:
        """The frozen modules whose weights determine the cached features (hashed into the cache key)."""
        te, ie = self._cacheable_encoders()
        out = {}
        if te is not None:
            out["text"] = te.backbone
        if ie is not None:
            out["image"] = ie.backbone if hasattr(ie, "backbone") else ie
        return out

    @torch.no_grad()
    def compute_cached(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The cacheable features of a batch (eval mode), keyed as in :meth:`cache_spec`."""
        te, ie = self._cacheable_encoders()
        out = te.compute_cached(batch["input_ids"], batch["attention_mask"]) if te is not None else {}
        if ie is not None:
            out.update(ie.compute_cached(batch["pixel_values"]))
        return out


def build_model(cfg: ModelConfig, info: TaskInfo, processor, load_weights: bool = True,
                inference: bool = False) -> MultimodalModel:
    """Instantiate the registered model ``cfg.name``.

    Args:
        load_weights: fetch pretrained backbone weights; False when a checkpoint is loaded right after.
        inference: build only what eval-mode ``forward`` reads (see :meth:`MultimodalModel.training_only_modules`).
    """
    from mmsenti.registry import MODELS

    builder = MODELS.get(cfg.name).builder
    return builder(cfg, info, processor, load_weights=load_weights, **({"inference": True} if inference else {}))


def save_pretrained(directory: str | Path, model: MultimodalModel, processor, config: Config) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (directory / "labels.json").write_text(
        json.dumps({"task": model.info.task, "label_names": model.info.label_names}, indent=2) + "\n")
    processor.for_inference().save(directory)
    text = getattr(model, "text_encoder", None)
    if text is not None and config.model.text_encoder.name != "tiny-bert":
        # The exact architecture, so loading needs neither the pretrained weights nor the hub.
        text.backbone.config.save_pretrained(str(directory / TEXT_BACKBONE_DIR))
    save_inference_weights(model, directory / "model.safetensors")
    write_manifest(directory)  # last: it records the checksums of whatever was written above


def save_inference_weights(model: MultimodalModel, path: str | Path) -> None:
    """Write :meth:`MultimodalModel.inference_state_dict` as safetensors (tensors that share memory stored once,
    as ``safetensors.torch.save_model`` does, so ``load_model`` reads them back strictly)."""
    from safetensors.torch import _remove_duplicate_names, save_file

    state = model.inference_state_dict()
    metadata: dict[str, str] = {}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata[name] = kept
            del state[name]
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or None)


def load_inference_weights(model: MultimodalModel, path: str | Path, device: str | torch.device = "cpu") -> None:
    """Load saved weights strictly: every key of ``model`` present, nothing unexpected. A file written before
    saved models were lean also holds the training-only modules; those tensors (and only those) are skipped."""
    from safetensors import SafetensorError
    from safetensors.torch import _remove_duplicate_names, load_file

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: missing (the model folder is incomplete)")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({e}); the weights are damaged") from None
    drop = tuple(f"{name}." for name in model.training_only_modules())
    skipped = [k for k in state if drop and k.startswith(drop)]
    if skipped:
        log.info("%s: skipping %d training-only tensors (saved before models were lean)", path, len(skipped))
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing)
    unexpected = list(unexpected)
    # Tensors that share memory are stored once (see save_inference_weights): their other names are not missing.
    for group in _remove_duplicate_names(model.state_dict(), preferred_names=list(state)).values():
        for name in group:
            if name in missing:
                missing.remove(name)
            else:
                unexpected.append(name)
    if missing or unexpected:
        raise ModelFileError(f"{path}: the weights do not fit the model config.json describes (missing keys "
                             f"{sorted(missing)[:10]}, unexpected keys {sorted(unexpected)[:10]})")


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model directory or a run directory (whose exported model lives in ``RUN_DIR/model``)."""
    path = Path(path)
    for cand in (path, path / "model"):
        # config.json + any other file of the format: a model folder, whose missing files are then named
        if (cand / "config.json").is_file() and any((cand / f).is_file() for f in (
                "model.safetensors", "labels.json", "preprocessing.json", "manifest.json")):
            return cand
    raise ModelFileError(f"{path}: not a trained mmsenti model or run directory (no model.safetensors + "
                         f"config.json)")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """Load ``(model, processor, config)`` from a model or run directory; weights are loaded strictly.

    The files' checksums are verified first; a damaged or missing file is a :class:`ModelFileError` naming it.
    """
    from mmsenti.data.processing import Processor

    directory = resolve_model_dir(path)
    verify_manifest(directory)
    cfg = read_config(directory)
    task, label_names = read_labels(directory)
    processor = Processor.load(directory)
    model_cfg = cfg.model
    if (directory / TEXT_BACKBONE_DIR / "config.json").is_file():
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.text_encoder.pretrained = str(directory / TEXT_BACKBONE_DIR)  # architecture only (no weights read)
    model = build_model(model_cfg, TaskInfo(task, label_names), processor, load_weights=False, inference=True)
    load_inference_weights(model, directory / "model.safetensors", device)
    return model.to(device).eval(), processor, cfg
