"""Every config under configs/ and every row of every experiment file builds its model, not only parses.

Backbones whose weights are on this machine (MiniLM-L6, EfficientNet-Lite0) are built with them; the others
(DeBERTa-v3, ResNet-50, CLIP) are tiny random stand-ins of the same architectures, and the INFIG layers around them
are shrunk to match (width 32), so the paper's configurations build in well under a second each.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT

from mmsenti.config import load_config
from mmsenti.experiment import load_experiment
from mmsenti.experiment.runner import _backbones, _weights_problem
from mmsenti.experiment.spec import task_of
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import build_processor

CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
STAND_INS = {
    "text": ["model.text_encoder.pretrained=false", "model.text_encoder.vocab_size=300",
             "model.text_encoder.arch={hidden_size: 32, num_hidden_layers: 4, num_attention_heads: 2, "
             "intermediate_size: 64}"],
    "image": ["model.image_encoder.pretrained=false", "model.image_encoder.image_size=64"],
    "clip": ["model.clip.pretrained=false", "model.clip_dim=16",
             "model.clip.arch={text_config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
             "num_attention_heads: 2}, vision_config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
             "num_attention_heads: 2}, projection_dim: 16}"],
}
SHRINK_INFIG = ["model.width=32", "model.image_heads=2", "model.fusion_heads=2", "model.queue_size=32"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _stand_ins(cfg) -> list[str]:
    absent = [kind for kind, name, pretrained in _backbones(cfg)
              if _weights_problem(kind, name, pretrained, online=lambda: False)]
    out = [o for kind in absent for o in STAND_INS[kind]]
    return [*out, *SHRINK_INFIG] if out and cfg.model.name == "infig" else out


# A `features` dataset gives the model its feature widths at training (adopt_data): these are the default extraction's.
EXTRACTED_DIMS = ["model.feature_dims={audio: 25, vision: 1291}"]


def _build(path, overrides: list[str]):
    cfg = load_config(path, overrides)
    extracted = EXTRACTED_DIMS if cfg.data.name == "features" and not getattr(cfg.model, "feature_dims", None) else []
    cfg = load_config(path, [*overrides, *_stand_ins(cfg), *extracted])
    task = task_of(cfg)
    info = TaskInfo(task, ["negative", "neutral", "positive"] if task == "classification" else None)
    processor = build_processor(cfg.model, ["what a lovely day", "this is awful", "meh"], task)
    torch.manual_seed(0)
    model = build_model(cfg.model, info, processor)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    return model


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_builds_its_model(path):
    model = _build(path, [])
    assert model.config.name == load_config(path).model.name


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_row_builds_its_model(path):
    exp = load_experiment(path)
    assert exp.rows
    seen = set()
    for row in exp.rows:
        cfg = exp.configs[row.id]
        key = json.dumps(cfg.model.__dict__, default=str, sort_keys=True) + task_of(cfg)
        if key in seen:  # rows differing only in data or optimisation settings build the same model
            continue
        seen.add(key)
        model = _build(exp.config_path(row), exp.overrides(row))
        for override in row.set:  # the row's own switches reach the model (e.g. the GAM layer of a sweep)
            k, v = override.split("=", 1)
            if k.startswith("model.") and k.count(".") == 1:
                assert str(getattr(model.config, k.split(".")[1])).lower() == v.lower(), (row.id, override)
