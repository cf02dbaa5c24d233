"""RAHP: memory-bank retrieval (no self-retrieval, batch independence, saved with the model), in-batch mode,
config errors, and an end-to-end run where retrieval beats the same model without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsenti.config import Config, ConfigError, load_config
from mmsenti.data.synthetic_mmsa import SyntheticMMSADataConfig, build_synthetic_mmsa
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import build_processor
from mmsenti.models.folder import ModelFolder
from mmsenti.models.rahp import Rahp, RahpConfig

DIMS = {"text": 32, "audio": 16, "vision": 24}
INFO = TaskInfo("regression", None)


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return build_synthetic_mmsa(SyntheticMMSADataConfig(n_train=96, n_valid=16, n_test=24, n_clusters=12))


def _model(data, **kw) -> tuple[Rahp, object, RahpConfig]:
    torch.manual_seed(0)
    cfg = RahpConfig(text_input="features", feature_dims=dict(DIMS), width=32, heads=2, hidden=32, k=4,
                     num_prompts=2, **kw)
    proc = build_processor(cfg, [s.text or "" for s in data.split("train")], "regression")
    model = build_model(cfg, INFO, proc)
    return model, proc, cfg


def _batches(proc, samples, size=32):
    return [proc(samples[i:i + size]) for i in range(0, len(samples), size)]


def _predict(model, proc, samples) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(proc(samples))["logits"][:, 0]


@pytest.fixture(scope="module")
def bank_model(data):
    model, proc, cfg = _model(data)
    model.refresh_bank(_batches(proc, data.split("train")))
    return model, proc, cfg


def test_bank_mode_prediction_is_batch_independent(bank_model, data):
    model, proc, _ = bank_model
    test = data.split("test")
    alone = _predict(model, proc, test[:1])
    mixed = _predict(model, proc, [test[5], *test[10:20], test[0]])  # other companions, other position, padding
    full = _predict(model, proc, test)
    assert torch.isfinite(full).all()
    assert torch.allclose(alone[0], mixed[-1], atol=1e-5) and torch.allclose(alone[0], full[0], atol=1e-5)
    assert torch.allclose(mixed[0], full[5], atol=1e-5)
    assert torch.equal(full, _predict(model, proc, test))  # deterministic


def test_training_never_retrieves_the_sample_itself(bank_model, data):
    model, proc, _ = bank_model
    train = data.split("train")
    batch = proc(train[:32])
    model.train()
    with torch.no_grad():
        enc = model.encode(batch)
        found = model.retrieve(enc, batch["ids"])
    model.eval()
    own = model.bank.rows_for_ids(batch["ids"])
    assert (own >= 0).all()  # the batch is in the bank ...
    for target, per_source in found.items():
        for source, nb in per_source.items():
            assert nb.rows.shape == (32, 4) and (nb.rows >= 0).all()
            assert not (nb.rows == own[:, None]).any(), (target, source)  # ... but never retrieves itself
    # Without the exclusion the in-modality search would have returned the sample itself first.
    raw = model.bank.query(enc["text"].embedding, "text", k=1)
    assert torch.equal(raw.rows[:, 0], own)


def test_empty_sequence_gives_finite_outputs(bank_model, data):
    model, proc, _ = bank_model
    sample = data.split("test")[0]
    empty = type(sample)(id="empty", label=0.0, text="x",
                         features={**sample.features, "audio": np.zeros((0, DIMS["audio"]), np.float32)})
    out = _predict(model, proc, [empty, sample])
    assert torch.isfinite(out).all()
    model.train()
    loss = model.compute_loss(model(proc([empty, *data.split("train")[:7]])), proc([empty, *data.split("train")[:7]]))
    model.eval()
    assert all(torch.isfinite(v) for v in loss.values()) and "loss_ret" in loss


def test_in_batch_mode_depends_on_the_batch(data):
    model, proc, _ = _model(data, retrieval="in-batch")
    test = data.split("test")
    a = _predict(model, proc, test[:8])
    b = _predict(model, proc, [test[0], *test[12:20]])
    assert not torch.allclose(a[0], b[0], atol=1e-4)  # same sample, other batch companions
    assert not model.bank.is_built  # nothing is stored


def test_bank_round_trips_through_saved_model(tmp_path, bank_model, data):
    model, proc, cfg = bank_model
    test = data.split("test")
    expected = _predict(model, proc, test)
    config = Config(data=SyntheticMMSADataConfig(n_train=96, n_valid=16, n_test=24), model=cfg)
    ModelFolder.save(tmp_path / "m", model, proc, config)
    folder = ModelFolder.open(tmp_path / "m")  # strict load, no training data
    loaded, proc2 = folder.load_model(), folder.processor
    assert len(loaded.bank) == 96 and loaded.bank.ids == model.bank.ids
    assert torch.allclose(_predict(loaded, proc2, test), expected, atol=1e-6)
    # The trainer's checkpoints: a plain state_dict into a fresh model (strict) restores the bank too.
    fresh, _, _ = _model(data)
    assert not fresh.bank.is_built
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(_predict(fresh, proc, test), expected, atol=1e-6)


@pytest.mark.parametrize("override, match", [
    ("model.retrieval=nearest", "model.retrieval"),
    ("model.k=0", "model.k"),
    ("model.modalities=[text,smell]", "model.modalities"),
    ("model.width=30", "divisible"),
])
def test_config_errors_are_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, ["model.name=rahp", override])
    assert "\n" not in str(e.value)


def test_missing_feature_dims_is_a_config_error(data):
    cfg = RahpConfig(text_input="features", feature_dims={"text": 32})
    proc = build_processor(cfg, ["a"], "regression")
    with pytest.raises(ConfigError, match="feature_dims.audio"):
        build_model(cfg, INFO, proc)


@pytest.mark.slow
def test_retrieval_beats_no_retrieval_end_to_end(tmp_path):
    from mmsenti.train.trainer import Trainer

    base = ["data.name=synthetic-mmsa", "data.n_train=600", "data.n_valid=150", "data.n_test=400",
            "data.n_clusters=96", "model.name=rahp", "model.text_input=features",
            "model.feature_dims={text: 32, audio: 16, vision: 24}", "model.width=32", "model.heads=2",
            "model.hidden=32", "model.num_prompts=2", "optim.epochs=5", "run.quiet=true", "run.log_every=1000"]
    results = {}
    for mode in ("bank", "none"):
        results[mode] = Trainer(load_config(None, [*base, f"model.retrieval={mode}"]), tmp_path / mode).fit()
    mae = {mode: r["test"]["mae"] for mode, r in results.items()}
    assert mae["bank"] < mae["none"] - 0.05, mae
    assert (tmp_path / "bank" / "model" / "model.safetensors").is_file()


def test_tokens_and_image_inputs_train_on_scenes(tmp_path, tiny_overrides):
    """Text through the text encoder, image regions through the CNN, classification labels in the bank."""
    from mmsenti.train.trainer import Trainer

    overrides = [*tiny_overrides, "model.name=rahp-tiny", "model.width=32", "model.k=4", "optim.epochs=1"]
    results = Trainer(load_config(None, overrides), tmp_path).fit()
    cm = torch.tensor(results["test"]["confusion_matrix"])  # the reported accuracy is that of the confusion matrix
    assert cm.sum() > 0 and abs(results["test"]["accuracy"] - cm.trace().item() / cm.sum().item()) < 1e-9
    model = ModelFolder.open(tmp_path).load_model()
    assert len(model.bank) == 96 and model.bank.payload["labels"].dtype == torch.long
