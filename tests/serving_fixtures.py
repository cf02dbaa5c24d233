"""Saved models and post files for the prediction and serving tests (untrained tiny models: parity needs no skill)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmsenti.config import load_config
from mmsenti.data.scenes import ScenesConfig, build_scenes, make_sample
from mmsenti.models.base import TaskInfo, build_model, save_pretrained
from mmsenti.models.encoders import build_processor

TINY_MODEL = ["model.text_encoder.width=32", "model.text_encoder.num_layers=1", "model.text_encoder.num_heads=2",
              "model.text_encoder.vocab_size=300", "model.image_encoder.width=8", "model.image_encoder.image_size=32",
              "data.num_train=48"]
TINY_INFIG = ["model.name=infig", "model.width=32", "model.image_layers=1", "model.image_heads=2",
              "model.fusion_layers=1", "model.fusion_heads=2", "model.clip_dim=16", "model.queue_size=16",
              "model.hfam_layers=1", "model.modality_dropout=0.3"]


def save_tiny_model(directory: Path, overrides=(), seed: int = 0) -> Path:
    """A randomly initialised tiny model saved as ``mmsenti.load_model`` reads it (late fusion by default)."""
    cfg = load_config(None, TINY_MODEL + list(overrides))
    data = build_scenes(ScenesConfig(num_train=48, num_dev=0, num_test=0, image_size=32))
    processor = build_processor(cfg.model, [s.text for s in data.splits["train"]], data.task)
    torch.manual_seed(seed)
    model = build_model(cfg.model, TaskInfo(data.task, data.label_names), processor).eval()
    save_pretrained(directory, model, processor, cfg)
    return directory


def write_posts(directory: Path, n: int, split: str = "test", name: str = "posts.jsonl") -> tuple[Path, list]:
    """``n`` generated scenes posts as a JSON-lines file with their images beside it; returns (file, samples)."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = [make_sample(i, split, seed=7, image_size=48) for i in range(n)]
    with open(directory / name, "w") as f:
        for s in samples:
            s.image.save(directory / f"{s.id}.png")
            f.write(json.dumps({"id": s.id, "text": s.text, "image": f"{s.id}.png"}) + "\n")
    return directory / name, samples
