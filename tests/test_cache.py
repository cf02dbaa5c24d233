"""Partial fine-tuning of HF encoders and the frozen-feature cache (keys, invalidation, rebuild, equality)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmsenti.backbones import load_text_backbone
from mmsenti.cli import main
from mmsenti.config import load_config
from mmsenti.data.base import Sample
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import TextEncoder, build_processor, text_state_key
from mmsenti.train.cache import (
    MANIFEST,
    CachedCollator,
    cache_key,
    clear_entries,
    list_entries,
    open_or_build,
    verify_entry,
)
from mmsenti.train.trainer import Trainer

TINY_BERT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=200,
                 max_position_embeddings=64)
TINY_DEBERTA = dict(TINY_BERT, position_buckets=16, max_relative_positions=32)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MMSENTI_CACHE_DIR", str(tmp_path / "cache"))


def _hf(preset: str, arch: dict, seed: int = 0):
    torch.manual_seed(seed)
    model, _ = load_text_backbone(preset, pretrained=False, config=dict(arch, hidden_dropout_prob=0.3,
                                                                        attention_probs_dropout_prob=0.3))
    return model


def _tokens(n=5, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i, real in enumerate([12, 7, 3, 12, 9][:n]):
        mask[i, real:] = 0
        ids[i, real:] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------- partial freezing
@pytest.mark.parametrize("preset, arch", [("bert-base-uncased", TINY_BERT), ("deberta-v3-base", TINY_DEBERTA)])
@pytest.mark.parametrize("trainable", [0, 1, 2])
def test_top_layers_from_cached_states_equal_the_full_forward(preset, arch, trainable):
    enc = TextEncoder(_hf(preset, arch), trainable_layers=trainable).eval()
    ids, mask = _tokens()
    full = enc(ids, mask)
    cached = {int(k.rsplit("_", 1)[1]): v for k, v in enc.compute_cached(ids, mask).items()}
    assert sorted(cached) == enc.cached_state_indices()
    part = enc(ids, mask, cached)
    real = mask.bool()
    for i in range(enc.frozen_depth, enc.num_layers + 1):
        torch.testing.assert_close(part.hidden_states[i][real], full.hidden_states[i][real], atol=1e-5, rtol=1e-4)


def test_only_the_top_layers_train_and_frozen_layers_stay_deterministic():
    enc = TextEncoder(_hf("bert-base-uncased", TINY_BERT), trainable_layers=1)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("backbone.encoder.layer.2.") for n in trainable)
    enc.train()
    ids, mask = _tokens()
    a, b = enc(ids, mask), enc(ids, mask)
    torch.testing.assert_close(a.hidden_states[2], b.hidden_states[2])  # frozen: no dropout in train mode
    assert not torch.allclose(a.hidden_states[3], b.hidden_states[3])  # the trained top layer has dropout
    assert enc.cached_state_indices() == [0, 1, 2]
    enc.needed_states = {-1}  # a model that reads only the last state caches just the top layer's input
    assert enc.cached_state_indices() == [2]
    assert TextEncoder(_hf("bert-base-uncased", TINY_BERT), trainable_layers=-1).cached_state_indices() == []


# ---------------------------------------------------------------------------------------------- cache entries
def _scenes_model(overrides, tiny_overrides, seed=0):
    cfg = load_config(None, [*tiny_overrides, "model.image_encoder.freeze=true", *overrides])
    from mmsenti.data.scenes import build_scenes

    bundle = build_scenes(cfg.data)
    proc = build_processor(cfg.model, [s.text for s in bundle.splits["train"]], bundle.task)
    torch.manual_seed(seed)
    model = build_model(cfg.model, TaskInfo(bundle.task, bundle.label_names), proc)
    return cfg, bundle, proc, model


def _image_samples(tmp_path, n=6):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(id=f"s{i}", label=i % 2, text=f"post number {i} is " + "good " * i, image=str(path)))
    return samples


def test_cache_key_changes_with_weights_preprocessing_data_and_dtype(tmp_path, tiny_overrides):
    _, _, proc, model = _scenes_model(["model.name=late-fusion-tiny"], tiny_overrides)
    samples = _image_samples(tmp_path)
    key, parts = cache_key(model, proc, samples)
    assert key == cache_key(model, proc, samples)[0]  # deterministic
    assert set(parts["spec"]) == {"cached_image_map"}
    _, _, proc2, model2 = _scenes_model(["model.name=late-fusion-tiny"], tiny_overrides, seed=1)
    assert cache_key(model2, proc, samples)[0] != key  # other (frozen) weights
    proc.image_transform.size = 48
    assert cache_key(model, proc, samples)[0] != key  # other preprocessing
    proc.image_transform.size = 32
    assert cache_key(model, proc, samples)[0] == key
    edited = [Sample(id=s.id, label=s.label, text=s.text + ("!" if s.id == "s3" else ""), image=s.image) for s in samples]
    assert cache_key(model, proc, edited)[0] != key  # other text
    Image.new("RGB", (40, 40)).save(samples[2].image)  # an image file replaced in place
    os.utime(samples[2].image, ns=(1, 1))
    assert cache_key(model, proc, samples)[0] != key
    assert cache_key(model, proc, samples, dtype="float16")[0] != cache_key(model, proc, samples)[0]
    src = tmp_path / "train.csv"
    src.write_text("a")
    k1 = cache_key(model, proc, samples, sources=[src])[0]
    src.write_text("b")
    assert cache_key(model, proc, samples, sources=[src])[0] != k1  # the dataset's files are hashed


def test_cached_features_equal_recomputed_ones(tmp_path, tiny_overrides):
    _, _, proc, model = _scenes_model(["model.name=infig-tiny", "model.text_encoder.num_layers=3",
                                       "model.text_encoder.trainable_layers=1", "model.use_clip=false",
                                       "model.hfam_layers=3", "model.image_layers=3"], tiny_overrides)
    samples = _image_samples(tmp_path)
    store = open_or_build(tmp_path / "c", model, proc, samples, batch_size=4)
    assert set(store.features) == {text_state_key(1), text_state_key(2), "cached_image_map"}
    collate = CachedCollator(proc, store, model.cache_replaces())
    model.eval()
    for batch_ids in ([0, 1, 2], [5, 3], [4]):
        part = [samples[i] for i in batch_ids]
        cached, plain = collate(part), proc(part)
        assert "pixel_values" not in cached  # images are not even decoded
        fresh = model.compute_cached(plain)
        real = plain["attention_mask"].bool()
        for k, v in fresh.items():
            got = cached[k]
            if v.dim() == 3 and k.startswith("cached_text"):
                torch.testing.assert_close(got[real], v[real])
            else:
                torch.testing.assert_close(got, v)
        torch.testing.assert_close(model(cached)["logits"], model(plain)["logits"], atol=1e-5, rtol=1e-4)


def test_truncated_or_partial_entries_are_rebuilt_never_read(tmp_path, tiny_overrides):
    _, _, proc, model = _scenes_model(["model.name=late-fusion-tiny"], tiny_overrides)
    samples = _image_samples(tmp_path)
    root = tmp_path / "c"
    store = open_or_build(root, model, proc, samples)
    reference = store.gather(["s1", "s4"])["cached_image_map"].clone()
    assert verify_entry(store.directory) is None
    data = store.directory / "cached_image_map.bin"
    with open(data, "r+b") as f:  # a truncated file
        f.truncate(data.stat().st_size // 2)
    assert "truncated" in verify_entry(store.directory)
    store = open_or_build(root, model, proc, samples)
    assert verify_entry(store.directory) is None  # rebuilt in place
    torch.testing.assert_close(store.gather(["s1", "s4"])["cached_image_map"], reference)

    raw = bytearray(data.read_bytes())  # same size, flipped bytes: the digest catches it
    raw[100:108] = bytes(b ^ 0xFF for b in raw[100:108])
    data.write_bytes(bytes(raw))
    assert "corrupted" in verify_entry(store.directory)
    torch.testing.assert_close(open_or_build(root, model, proc, samples).gather(["s1", "s4"])["cached_image_map"],
                               reference)

    (store.directory / MANIFEST).unlink()  # a build killed before its manifest was written
    assert "incomplete" in verify_entry(store.directory)
    torch.testing.assert_close(open_or_build(root, model, proc, samples).gather(["s1", "s4"])["cached_image_map"],
                               reference)
    partial = root / f".{store.directory.name}.partial-999999"  # a leftover temporary directory
    partial.mkdir()
    (root / store.directory.name).rename(root / "elsewhere")
    open_or_build(root, model, proc, samples)
    assert not partial.exists()


def test_training_with_and_without_the_cache_gives_the_same_losses(tmp_path, tiny_overrides):
    common = [*tiny_overrides, "model.name=infig-tiny", "model.text_encoder.num_layers=3",
              "model.text_encoder.trainable_layers=1", "model.image_encoder.freeze=true", "model.hfam_layers=2",
              "model.image_layers=2", "model.queue_size=64", "optim.epochs=2", "data.num_train=48",
              f"run.cache_dir={tmp_path / 'cache'}"]
    results = {}
    runs = {"true": ["run.feature_cache=true"], "false": ["run.feature_cache=false"],
            "fp16": ["run.feature_cache=true", "run.cache_dtype=float16"]}
    for name, extra in runs.items():
        trainer = Trainer(load_config(None, [*common, *extra]), tmp_path / name)
        results[name] = trainer.fit()
        assert trainer.use_cache == (name != "false")
        results[name]["history"] = trainer.state.history
    for a, b, c in zip(results["true"]["history"], results["false"]["history"], results["fp16"]["history"],
                       strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["dev_loss"] == pytest.approx(b["dev_loss"], rel=1e-4)
        # fp16 on disk rounds the cached states to 11 significant bits: the losses move by far less than a step
        assert c["train_loss"] == pytest.approx(b["train_loss"], rel=2e-3)
        assert c["dev_loss"] == pytest.approx(b["dev_loss"], rel=2e-3)
    assert results["true"]["test"]["accuracy"] == pytest.approx(results["false"]["test"]["accuracy"])
    entries = list_entries(tmp_path / "cache")
    assert {e["split"] for e in entries} == {"train", "dev", "test"} and len(entries) == 6  # fp32 and fp16 entries
    assert all(e["status"] == "complete" for e in entries)


def test_cache_cli_build_info_clear(tmp_path, tiny_overrides, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: late-fusion\n  image_encoder:\n    freeze: true\n")
    sets = sum((["--set", o] for o in tiny_overrides), [])
    cache = tmp_path / "cli-cache"
    assert main(["cache", "build", "--config", str(cfg), "--dir", str(cache), "--split", "dev", *sets]) == 0
    assert main(["cache", "info", "--dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "1 entries" in out and "scenes" in out and "complete" in out
    assert main(["cache", "clear", "--dir", str(cache)]) == 2  # needs keys or --all
    assert main(["cache", "clear", "--all", "--dir", str(cache)]) == 0
    assert list_entries(cache) == [] and clear_entries(cache) == 0
    cfg.write_text("model:\n  name: late-fusion\n")
    assert main(["cache", "build", "--config", str(cfg), "--dir", str(cache), *sets]) == 2  # nothing frozen
    assert "nothing to cache" in capsys.readouterr().err
