"""Every registered model, as its tiny variant (as timm's test_model_forward): builds on scenes, runs
forward + loss + backward without NaNs, saves and loads; `mmsenti list models` and the variants agree."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny

from mmsenti.config import load_config
from mmsenti.data.scenes import ScenesConfig, build_scenes
from mmsenti.losses import total_loss
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.folder import ModelFolder
from mmsenti.registry import MODELS


@pytest.fixture(scope="module")
def scenes():
    return build_scenes(ScenesConfig(num_train=24, num_dev=4, num_test=4, image_size=32))


def _build(name, scenes):
    cfg, model, processor = build_tiny(name, scenes)
    if hasattr(model, "refresh_bank"):  # a retrieval model's memory bank, as the trainer's epoch hook builds it
        model.refresh_bank([processor(scenes.splits["train"][i:i + 8]) for i in range(0, 24, 8)])
    return cfg, model, processor


def test_registry_lists_the_spine_models():
    assert {"late-fusion", "text-only", "image-only"} <= set(MODELS.names())
    assert all(entry.description for entry in MODELS)


def test_every_registered_model_has_a_tiny_variant_and_list_shows_each_one(capsys):
    """One source of truth: the registry's variants are what `mmsenti list models` shows (each under its model),
    and every model has `<name>-tiny`, which the tests build."""
    from mmsenti.cli import main

    variants = MODELS.variants()
    assert {v.name for v in variants} >= {f"{name}-tiny" for name in MODELS.names()}
    assert all(v.base in MODELS.names() and v.description for v in variants)
    assert main(["list", "models"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == [n for e in MODELS for n in (e.name, *(v.name for v in MODELS.variants(e.name)))]
    assert main(["list", "models", "--markdown"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == MODELS.names()
    assert all(f"`{v.name}`" in next(r for r in rows if r.startswith(f"| `{v.base}`")) for v in variants)


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_backward_every_param_gets_a_gradient(name, scenes):
    cfg, model, processor = _build(name, scenes)
    assert cfg.model.name == name  # the variant resolves to its model
    batch = processor(scenes.splits["train"][:8])
    model.train()
    out = model(batch)
    assert out["logits"].shape == (8, 3) and torch.isfinite(out["logits"]).all()
    terms = model.compute_loss(out, batch)
    assert all(k.startswith("loss") or not v.requires_grad for k, v in terms.items())
    loss = total_loss(terms)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing
    not_finite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not not_finite, not_finite


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
    names = MODELS.names() + [v.name for v in MODELS.variants()] + DATASETS.names()
    missing = [n for n in names if f"`{n}`" not in readme]
    assert not missing, f"add to README (mmsenti list --markdown): {missing}"


def test_create_model_builds_any_model_with_its_processor(scenes):
    """The public factory: a name (model or variant) or a config, settings as keyword arguments (nested with __ or
    as a mapping) over the name's, checked as a config file is."""
    import mmsenti
    from mmsenti.config import ConfigError
    from mmsenti.models.factory import create_model

    assert mmsenti.create_model is create_model and "create_model" in mmsenti.__all__
    texts = [s.text for s in scenes.splits["train"]]
    model, processor = create_model("infig-tiny", texts=texts, width=48, text_encoder__num_layers=2,
                                    image_encoder={"width": 4})
    cfg = model.config
    assert (cfg.name, cfg.width, cfg.text_encoder.num_layers, cfg.image_encoder.width) == ("infig", 48, 2, 4)
    assert cfg.text_encoder.width == MODELS.resolve("infig-tiny")[1]["text_encoder"]["width"]  # the variant's, kept
    assert model.training and not model.inference and len(processor.tokenizer) > 100  # learned on the texts
    with torch.no_grad():
        assert model.eval()(processor(scenes.splits["dev"], training=False))["logits"].shape == (4, 3)
    # A config (or its model section) with settings on top; regression has one output.
    again, _ = create_model(load_config(None, ["model.name=text-only-tiny"]), texts=texts, hidden=8,
                            task="regression", label_names=None, inference=True)
    assert again.config.hidden == 8 and again.inference and again.head[-1].out_features == 1
    assert create_model(again.config, texts=texts)[0].config == again.config
    with pytest.raises(ConfigError, match=r"unknown config key 'model.text_encoder.widht'"):
        create_model("late-fusion-tiny", text_encoder__widht=8)
    with pytest.raises(ConfigError, match="model.name: unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ConfigError, match="bad setting name 'text_encoder____width'"):
        create_model("late-fusion-tiny", text_encoder____width=8)
