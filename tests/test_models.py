"""Every registered model: builds from its default config on scenes, runs forward/backward, saves and loads."""

from __future__ import annotations

import pytest
import torch

from mmsenti.config import load_config
from mmsenti.data.scenes import ScenesConfig, build_scenes
from mmsenti.losses import total_loss
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import build_processor
from mmsenti.models.folder import ModelFolder
from mmsenti.registry import MODELS

SMALL = ["model.text_encoder.width=32", "model.text_encoder.num_heads=2", "model.image_encoder.width=8",
         "model.image_encoder.image_size=32"]
# Model-specific shrinking (keeps each model's structure: layer counts stay at their defaults where they matter).
SMALL_BY_MODEL = {
    "infig": ["model.width=32", "model.image_layers=3", "model.image_heads=2", "model.fusion_heads=2",
              "model.clip_dim=16", "model.queue_size=16"],
    # rahp's default modalities are MOSI's text/audio/vision; scenes has text + image.
    "rahp": ["model.modalities=[text, image]", "model.width=32", "model.heads=2", "model.hidden=16", "model.k=2"],
}


@pytest.fixture(scope="module")
def scenes():
    return build_scenes(ScenesConfig(num_train=24, num_dev=4, num_test=4, image_size=32))


def _build(name, scenes):
    cfg = load_config(None, [f"model.name={name}"] + SMALL + SMALL_BY_MODEL.get(name, []))
    info = TaskInfo(scenes.task, scenes.label_names)
    processor = build_processor(cfg.model, [s.text for s in scenes.splits["train"]], info.task)
    torch.manual_seed(0)
    model = build_model(cfg.model, info, processor)
    if hasattr(model, "refresh_bank"):  # a retrieval model's memory bank, as the trainer's epoch hook builds it
        model.refresh_bank([processor(scenes.splits["train"][i:i + 8]) for i in range(0, 24, 8)])
    return cfg, model, processor


def test_registry_lists_the_spine_models():
    assert {"late-fusion", "text-only", "image-only"} <= set(MODELS.names())
    assert all(entry.description for entry in MODELS)


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_backward_every_param_gets_a_gradient(name, scenes):
    cfg, model, processor = _build(name, scenes)
    batch = processor(scenes.splits["train"][:8])
    model.train()
    out = model(batch)
    assert out["logits"].shape == (8, 3) and torch.isfinite(out["logits"]).all()
    terms = model.compute_loss(out, batch)
    assert all(k.startswith("loss") or not v.requires_grad for k, v in terms.items())
    total_loss(terms).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing


@pytest.mark.parametrize("name", MODELS.names())
def test_save_load_round_trip_gives_identical_outputs(name, scenes, tmp_path):
    cfg, model, processor = _build(name, scenes)
    model.eval()
    batch = processor(scenes.splits["dev"])
    with torch.no_grad():
        ref = model(batch)["logits"]
    ModelFolder.save(tmp_path, model, processor, cfg)
    folder = ModelFolder.open(tmp_path)
    loaded, proc2, cfg2 = folder.load_model(), folder.processor, folder.config
    assert cfg2 == cfg
    with torch.no_grad():
        out = loaded(proc2(scenes.splits["dev"]))["logits"]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_unimodal_models_reject_other_modalities():
    from mmsenti.config import ConfigError

    cfg = load_config(None, ["model.name=text-only", "model.modalities=[text, image]"])
    with pytest.raises(ConfigError, match="reads only"):
        build_model(cfg.model, TaskInfo("classification", ["a", "b"]), None)


def test_readme_documents_every_registered_model_and_dataset():
    """The README's tables are generated with `mmsenti list --markdown`; a new registry entry must appear there."""
    from pathlib import Path

    from mmsenti.registry import DATASETS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [n for n in MODELS.names() + DATASETS.names() if f"`{n}`" not in readme]
    assert not missing, f"add to README (mmsenti list --markdown): {missing}"
