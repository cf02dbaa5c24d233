"""Base class of every mmsenti model, model building, and the saved-model directory format.

A trained model is a directory::

    config.json          the full resolved config (data, model, optim, run) it was trained with
    labels.json          task and label names
    model.safetensors    weights
    preprocessing.json   + tokenizer/   what turns raw text/images into inputs
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmsenti.config import Config, ModelConfig, build_config
from mmsenti.data.base import DataError
from mmsenti.losses import task_loss

log = logging.getLogger(__name__)


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
    """

    backbone_prefixes: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, info: TaskInfo):
        super().__init__()
        self.config = cfg
        self.info = info
        self.criterion = task_loss(info.task, cfg.label_smoothing)

    def compute_loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.criterion(outputs, batch)

    def no_weight_decay(self) -> set[str]:
        return set()


def build_model(cfg: ModelConfig, info: TaskInfo, processor, load_weights: bool = True) -> MultimodalModel:
    """Instantiate the registered model ``cfg.name``.

    Args:
        load_weights: fetch pretrained backbone weights; False when a checkpoint is loaded right after.
    """
    from mmsenti.registry import MODELS

    return MODELS.get(cfg.name).builder(cfg, info, processor, load_weights=load_weights)


def save_pretrained(directory: str | Path, model: MultimodalModel, processor, config: Config) -> None:
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (directory / "labels.json").write_text(
        json.dumps({"task": model.info.task, "label_names": model.info.label_names}, indent=2) + "\n")
    processor.save(directory)
    save_model(model, str(directory / "model.safetensors"))


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model directory or a run directory (whose exported model lives in ``RUN_DIR/model``)."""
    path = Path(path)
    for cand in (path, path / "model"):
        if (cand / "model.safetensors").is_file() and (cand / "config.json").is_file():
            return cand
    raise DataError(f"{path}: not a trained mmsenti model or run directory (no model.safetensors + config.json)")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """Load ``(model, processor, config)`` from a model or run directory; weights are loaded strictly."""
    from safetensors.torch import load_model

    from mmsenti.data.processing import Processor

    directory = resolve_model_dir(path)
    cfg = build_config(json.loads((directory / "config.json").read_text()))
    labels = json.loads((directory / "labels.json").read_text())
    processor = Processor.load(directory)
    model = build_model(cfg.model, TaskInfo(labels["task"], labels["label_names"]), processor, load_weights=False)
    load_model(model, str(directory / "model.safetensors"), strict=True, device=str(device))
    return model.to(device).eval(), processor, cfg
