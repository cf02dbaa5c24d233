"""Model presets: `paper` (offline error, tiny stand-ins of the same architectures) and `lite` (real weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from mmsenti.backbones import OFFLINE_PACKAGES, MissingWeightsError
from mmsenti.config import load_config
from mmsenti.data.base import Sample
from mmsenti.losses import total_loss
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import TimmImageEncoder, build_processor
from mmsenti.models.folder import ModelFolder

PAPER = str(ROOT / "configs/presets/infig-paper.yaml")
LITE = str(ROOT / "configs/presets/infig-lite.yaml")
INFO = TaskInfo("classification", ["positive", "neutral", "negative"])

# Random stand-ins of the paper's architectures (DeBERTa-v2 layers, timm ResNet-50, HF CLIP), shrunk.
PAPER_TINY = [
    "model.text_encoder.pretrained=false", "model.image_encoder.pretrained=false", "model.clip.pretrained=false",
    "model.text_encoder.arch={hidden_size: 32, num_hidden_layers: 3, num_attention_heads: 2, intermediate_size: 64}",
    "model.clip.arch={text_config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
    "num_attention_heads: 2}, vision_config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
    "num_attention_heads: 2}, projection_dim: 16}",
    "model.image_encoder.image_size=64", "model.width=32", "model.image_heads=2", "model.fusion_heads=2",
    "model.clip_dim=16", "model.queue_size=32", "model.text_encoder.vocab_size=300",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MMSENTI_WEIGHTS_DIR", str(tmp_path / "no-weights-here"))


def _samples(n=4):
    rng = np.random.default_rng(0)
    texts = ["what a lovely day", "this is awful", "meh, it is fine", "best concert ever"]
    return [Sample(id=f"p{i}", label=i % 3, text=texts[i % 4],
                   image=Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))) for i in range(n)]


def test_paper_preset_offline_without_weights_fails_with_one_clear_message():
    cfg = load_config(PAPER, ["data.name=mvsa-single"])
    with pytest.raises(MissingWeightsError) as e:
        build_processor(cfg.model, ["some text"], "classification")
    msg = str(e.value)
    assert "deberta" in msg.lower() and "MMSENTI_WEIGHTS_DIR" in msg and "model.text_encoder.pretrained" in msg
    assert "Traceback" not in msg and "\n" not in msg.strip()


def test_paper_preset_with_tiny_random_stand_ins_trains_and_round_trips(tmp_path):
    cfg = load_config(PAPER, ["data.name=mvsa-single", *PAPER_TINY])
    samples = _samples()
    torch.manual_seed(0)
    proc = build_processor(cfg.model, [s.text for s in samples], "classification")
    model = build_model(cfg.model, INFO, proc)
    assert model.text_encoder.backbone.config.model_type == "deberta-v2"
    assert model.image_encoder.backbone.backbone.default_cfg["architecture"] == "resnet50"
    assert type(model.clip).__name__ == "CLIPModel"
    assert isinstance(model.image_encoder.backbone, TimmImageEncoder)
    batch = proc(samples)
    assert batch["pixel_values"].shape[-1] == 64 and batch["clip_pixel_values"].shape[-1] == 224
    model.train()
    terms = model.compute_loss(model(batch), batch)
    assert {"loss_sc", "loss_g", "loss_f"} <= set(terms)
    total_loss(terms).backward()
    assert model.text_encoder.backbone.encoder.layer[0].attention.self.query_proj.weight.grad is not None
    assert model.clip_image_proj.weight.grad is not None
    assert all(p.grad is None for p in model.clip.parameters())  # the CLIP prior stays frozen
    ModelFolder.save(tmp_path, model, proc, cfg)
    assert (tmp_path / "text_backbone" / "config.json").is_file()  # the architecture travels with the model
    folder = ModelFolder.open(tmp_path)
    loaded, proc2, cfg2 = folder.load_model(), folder.processor, folder.config
    assert cfg2.model.text_encoder.pretrained is False
    model.eval()
    torch.testing.assert_close(loaded(proc2(samples))["logits"], model(batch)["logits"])


def test_text_only_and_image_only_infig_train_without_alignment_modules():
    for modalities in ("[text]", "[image]"):
        cfg = load_config(PAPER, ["data.name=mvsa-single", *PAPER_TINY, f"model.modalities={modalities}"])
        samples = _samples()
        proc = build_processor(cfg.model, [s.text for s in samples], "classification")
        model = build_model(cfg.model, INFO, proc).train()
        assert not hasattr(model, "gam_loss") and not hasattr(model, "hfam_loss") and not hasattr(model, "clip")
        batch = proc(samples)
        assert ("pixel_values" in batch) == (modalities == "[image]")
        terms = model.compute_loss(model(batch), batch)
        assert set(terms) == {"loss_sc"}
        total_loss(terms).backward()


def _need(*presets: str) -> None:
    for p in presets:
        if OFFLINE_PACKAGES[p].locate() is None:
            pytest.skip(f"offline weight package {OFFLINE_PACKAGES[p].distribution} is not installed")


def test_lite_preset_builds_from_the_offline_packages_and_caches_real_features(tmp_path):
    _need("minilm-l6", "efficientnet_lite0")
    cfg = load_config(LITE, ["data.name=cm-memes"])
    samples = _samples(3)
    torch.manual_seed(0)
    proc = build_processor(cfg.model, [s.text for s in samples], "classification")
    assert proc.tokenizer.model_max_length == 64 and proc.image_transform.size == 224
    model = build_model(cfg.model, INFO, proc)
    te = model.text_encoder
    assert te.num_layers == 6 and te.frozen_depth == 4
    assert sum(p.requires_grad for p in te.parameters()) == sum(1 for _ in te.backbone.encoder.layer[4:].parameters())
    assert all(not p.requires_grad for p in model.image_encoder.backbone.parameters())
    assert set(model.cache_spec()) == {"cached_text_state_4", "cached_image_map"}

    from mmsenti.train.cache import CachedCollator, open_or_build

    store = open_or_build(tmp_path, model, proc, samples)
    assert store.arrays["cached_image_map"].shape == (3, 1280, 7, 7)
    model.eval()
    plain, cached = proc(samples), CachedCollator(proc, store, model.cache_replaces())(samples)
    torch.testing.assert_close(model(cached)["logits"], model(plain)["logits"], atol=1e-4, rtol=1e-4)
    # The text states are MiniLM's: mean-pooled last layer ≈ sentence embedding direction of a paraphrase.
    enc = proc.tokenizer(["a lovely sunny day", "a beautiful sunny day", "the tax form is due"], padding=True,
                         return_tensors="pt")
    with torch.no_grad():
        out = te(enc["input_ids"], enc["attention_mask"])
    e = torch.nn.functional.normalize(out.mean_pool(), dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2
