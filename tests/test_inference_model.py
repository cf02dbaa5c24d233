"""The saved inference model: lean (no training-only state), strict, and answering exactly as the trained model.

Also: models declare their batch inputs (no CLIP inputs at inference), the CLIP adapter (transformers and
open_clip, tiny random models), and RAHP predictions that do not depend on the id a post is given.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file, save_file

from mmsenti.config import load_config
from mmsenti.data.scenes import ScenesConfig, build_scenes
from mmsenti.losses import total_loss
from mmsenti.models.base import build_model
from mmsenti.models.folder import ModelFolder
from mmsenti.registry import MODELS

CLIP_KEYS = {"clip_input_ids", "clip_attention_mask", "clip_pixel_values"}
# A tiny random open_clip architecture (built offline: pretrained=None); its tokenizer ships with open_clip.
OPEN_CLIP_TINY = ("model.clip.arch={embed_dim: 16, vision_cfg: {image_size: 32, layers: 1, width: 32, patch_size: 8, "
                  "head_width: 16}, text_cfg: {context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1}}")


@pytest.fixture(scope="module")
def scenes():
    return build_scenes(ScenesConfig(num_train=24, num_dev=6, num_test=4, image_size=32))


def _train_steps(model, processor, samples, steps=3):
    """A few optimizer steps, so momentum encoders, queues and the memory bank hold trained state."""
    def refresh():  # as the trainer's epoch hooks do
        model.refresh_bank([processor(samples[i:i + 8], training=False) for i in range(0, len(samples), 8)])

    if hasattr(model, "refresh_bank"):
        refresh()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for i in range(steps):
        batch = processor(samples[(8 * i) % len(samples):][:8])
        loss = total_loss(model.compute_loss(model(batch), batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if hasattr(model, "refresh_bank"):
        refresh()
    model.eval()


@pytest.mark.parametrize("name", MODELS.names())
def test_saved_inference_model_answers_as_the_trained_model(name, scenes, tmp_path):
    cfg, model, processor = build_tiny(name, scenes)
    _train_steps(model, processor, scenes.splits["train"])
    dev = scenes.splits["dev"]
    with torch.no_grad():
        ref_batch = model(processor(dev, training=False))["logits"]
        ref_alone = [model(processor([s], training=False))["logits"] for s in dev]
    ModelFolder.save(tmp_path, model, processor, cfg)
    folder = ModelFolder.open(tmp_path)
    loaded, proc2 = folder.load_model(), folder.processor
    assert loaded.inference and not loaded.training
    # Strict: the file holds exactly the loaded model's state, which is the trained model's minus training-only parts.
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(loaded.state_dict()) == set(model.inference_state_dict())
    with torch.no_grad():
        out_batch = loaded(proc2(dev, training=False))["logits"]
        torch.testing.assert_close(out_batch, ref_batch, rtol=0, atol=1e-6)
        for s, ref in zip(dev, ref_alone, strict=True):
            torch.testing.assert_close(loaded(proc2([s], training=False))["logits"], ref, rtol=0, atol=1e-6)


def test_infig_inference_build_has_no_training_state(scenes, tmp_path):
    cfg, model, processor = build_tiny("infig", scenes)
    dropped = model.training_only_modules()
    assert {"text_encoder_m", "image_encoder_m", "gam_loss", "clip", "hfam_loss"} <= set(dropped)
    full, lean = model.state_dict(), model.inference_state_dict()
    assert any(k.startswith("gam_loss.image_queue") for k in full) and not any(k.startswith("gam_loss") for k in lean)
    assert not any(k.startswith(("clip.", "text_encoder_m.")) for k in lean)
    numel = lambda sd: sum(v.numel() for v in sd.values())  # noqa: E731
    assert numel(lean) < 0.5 * numel(full)
    inference = build_model(cfg.model, model.info, processor.for_inference(), load_weights=False, inference=True)
    assert set(inference.state_dict()) == set(lean)
    assert not hasattr(inference, "text_encoder_m") and not hasattr(inference, "clip")
    inference.train()
    with pytest.raises(RuntimeError, match="built for inference"):
        inference(processor(scenes.splits["train"][:4]))


def test_loading_is_strict_and_reads_older_complete_files(scenes, tmp_path):
    cfg, model, processor = build_tiny("infig", scenes)
    model.eval()
    ModelFolder.save(tmp_path, model, processor, cfg)
    path = tmp_path / "model.safetensors"
    lean = load_file(str(path))
    # A model saved before the lean format holds everything: its training-only tensors are skipped.
    from mmsenti.models.folder import write_manifest

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    write_manifest(tmp_path)
    folder = ModelFolder.open(tmp_path)
    loaded, proc2 = folder.load_model(), folder.processor
    batch = scenes.splits["dev"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(proc2(batch, training=False))["logits"],
                                   model(processor(batch, training=False))["logits"], rtol=0, atol=0)
    # Anything else is still an error: an unexpected tensor, or a missing one (the files' checksums are rewritten,
    # so that this checks the keys, not the manifest).
    from mmsenti.models.folder import ModelFileError, write_manifest

    save_file({**lean, "fusion.99.weight": torch.zeros(1)}, str(path))
    write_manifest(tmp_path)
    with pytest.raises(ModelFileError, match="do not fit.*unexpected keys.*fusion.99.weight"):
        ModelFolder.open(tmp_path).load_model()
    save_file({k: v for k, v in lean.items() if k != "classifier.weight"}, str(path))
    write_manifest(tmp_path)
    with pytest.raises(ModelFileError, match="missing keys.*classifier.weight"):
        ModelFolder.open(tmp_path).load_model()


def test_models_declare_their_inputs_and_eval_batches_carry_no_clip_inputs(scenes, tmp_path):
    cfg, model, processor = build_tiny("infig", scenes)
    assert CLIP_KEYS <= set(cfg.model.batch_inputs(True)) and not CLIP_KEYS & set(cfg.model.batch_inputs(False))
    samples = scenes.splits["train"][:4]
    assert CLIP_KEYS <= set(processor(samples))
    assert not CLIP_KEYS & set(processor(samples, training=False))
    ModelFolder.save(tmp_path, model, processor, cfg)
    meta = json.loads((tmp_path / "preprocessing.json").read_text())
    assert [b["kind"] for b in meta["builders"]] == ["tokens", "pixels"] and not (tmp_path / "clip_tokenizer").exists()
    folder = ModelFolder.open(tmp_path)
    proc2 = folder.processor
    assert not CLIP_KEYS & set(proc2(samples))  # the saved processor is an inference one
    # rahp on feature sequences declares them instead of token ids.
    rcfg = load_config(None, ["model.name=rahp", "model.modalities=[text, audio]", "model.text_input=features",
                              "model.feature_dims={text: 8, audio: 4}"])
    assert set(rcfg.model.batch_inputs(False)) == {"text_features", "text_mask", "audio_features", "audio_mask"}


@pytest.mark.parametrize("kind", ["transformers", "open_clip"])
def test_clip_adapter_trains_and_saves_with_a_tiny_random_clip(kind, scenes, tmp_path):
    from mmsenti.backbones.clip import HFClip, OpenClip
    from mmsenti.data.processing import Processor

    extra = [] if kind == "transformers" else ["model.clip.name=open_clip:ViT-B-32", "model.clip.pretrained=false",
                                               OPEN_CLIP_TINY]
    cfg, model, processor = build_tiny("infig", scenes, *extra)
    assert isinstance(model.clip_api, HFClip if kind == "transformers" else OpenClip)
    assert model.clip_api.projection_dim == (32 if kind == "transformers" else 16)
    batch = processor(scenes.splits["train"][:8])
    if kind == "open_clip":  # open_clip's own tokenizer: fixed context, start/end-of-text ids, 0 = padding
        assert batch["clip_input_ids"].shape == (8, 16) and int(batch["clip_input_ids"][0, 0]) == 49406
        assert batch["clip_pixel_values"].shape == (8, 3, 32, 32)
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    model.train()
    out = model(batch)
    terms = model.compute_loss(out, batch)
    assert "loss_g" in terms and torch.isfinite(total_loss(terms))
    total_loss(terms).backward()
    assert model.clip_text_proj.weight.grad.abs().sum() > 0  # the CLIP prior reaches the loss
    assert all(torch.equal(v, clip_before[k]) for k, v in model.clip.state_dict().items())  # frozen
    # The training-run processor (resume) round-trips with its CLIP tokenizer.
    processor.save(tmp_path / "processor")
    reloaded = Processor.load(tmp_path / "processor")
    torch.testing.assert_close(reloaded(scenes.splits["train"][:8])["clip_input_ids"], batch["clip_input_ids"])
    # A training checkpoint keeps CLIP; the saved inference model does not and still answers the same.
    twin = build_model(cfg.model, model.info, processor, load_weights=False)
    twin.load_state_dict(model.state_dict())
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin._clip_features(batch), model._clip_features(batch), rtol=0, atol=0)
        ref = model(processor(scenes.splits["dev"], training=False))["logits"]
    ModelFolder.save(tmp_path / "model", model, processor, cfg)
    assert not any(k.startswith("clip.") for k in load_file(str(tmp_path / "model" / "model.safetensors")))
    folder = ModelFolder.open(tmp_path / "model")
    loaded, proc2 = folder.load_model(), folder.processor
    with torch.no_grad():
        torch.testing.assert_close(loaded(proc2(scenes.splits["dev"]))["logits"], ref, rtol=0, atol=1e-6)


def test_rahp_eval_prediction_does_not_depend_on_the_id(scenes):
    cfg, model, processor = build_tiny("rahp", scenes)
    train = scenes.splits["train"]
    _train_steps(model, processor, train)
    from dataclasses import replace

    # A training post is its own nearest neighbour: under its own id the old code dropped that row.
    ids = ["0", "1", "dev-0", train[3].id, train[5].id, "999999"]
    with torch.no_grad():
        for post in (train[3], scenes.splits["dev"][0]):
            outs = [model(processor([replace(post, id=i)], training=False))["logits"] for i in ids]
            for out in outs[1:]:
                torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
        # A training sample in eval mode may find its own row; in training mode it never does.
        own = train[3]
        enc = model.encode(processor([own], training=False))
        own_row = int(model.bank.rows_for_ids([own.id])[0])
        found_eval = model.retrieve(enc, [own.id])
        model.train()
        found_train = model.retrieve(enc, [own.id])
        model.eval()
    m = model.modalities[0]
    assert own_row in found_eval[m][m].rows[0].tolist()
    assert all(own_row not in nb.rows[0].tolist() for per in found_train.values() for nb in per.values())


def test_timm_encoder_eval_chunks_equal_one_batch():
    from mmsenti.compat import import_timm
    from mmsenti.models.encoders import TimmImageEncoder

    enc = TimmImageEncoder(import_timm().create_model("efficientnet_lite0", pretrained=False)).eval()
    x = torch.randn(10, 3, 64, 64)
    with torch.no_grad():
        chunked = enc(x).feature_map  # chunks of 4, 4, 2, channels-last
        torch.testing.assert_close(chunked, enc.backbone.forward_features(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(enc(x[5:6]).feature_map, chunked[5:6], atol=1e-5, rtol=1e-4)
