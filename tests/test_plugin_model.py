"""A model is one file: ``tests/plugin_model.py`` (a model with an input kind of its own), found through the
``mmsenti.models`` entry-point group as a third-party package's would be, trains, saves, loads, predicts, explains
(modality attribution + Integrated Gradients), exports to ONNX with parity and serves, with no other file knowing
it. A plugin that fails to import is reported in one line naming it, and the other models stay."""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import logging
import sys

import pytest
import torch

from mmsenti.registry import BROKEN_PLUGINS, ENTRY_POINT_GROUP, INPUTS, MODELS, RegistryError, load_plugins

TRAIN = ["model.name=trigram-fusion", "data.num_train=96", "data.num_dev=24", "data.num_test=16", "data.batch_size=16",
         "data.image_size=32", "model.image_encoder.width=8", "model.image_encoder.image_size=32",
         "model.image_encoder.freeze=true", "optim.epochs=2", "run.quiet=true", "run.log_every=1000"]


def _entry_points(*points: tuple[str, str]):
    """``importlib.metadata.entry_points`` as if packages declared ``points`` (name, value) in our group."""
    real = importlib.metadata.entry_points
    ours = importlib.metadata.EntryPoints(
        importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in points)

    def entry_points(**params):
        return ours if params.get("group") == ENTRY_POINT_GROUP else real(**params)

    return entry_points


@pytest.fixture(scope="module")
def plugin():
    """The plugin installed (an entry point naming tests/plugin_model.py) for this module's tests, then removed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.metadata, "entry_points", _entry_points(("trigram-fusion", "plugin_model")))
        assert load_plugins(ENTRY_POINT_GROUP, again=True) == ["trigram-fusion"]
        yield sys.modules["plugin_model"]
    MODELS.unregister("trigram-fusion")
    INPUTS.unregister("char-trigrams")
    sys.modules.pop("plugin_model", None)


@pytest.fixture(scope="module")
def run(plugin, tmp_path_factory):
    """The plugin model trained on scenes by ``mmsenti train`` (its image CNN frozen: the feature cache serves it)."""
    from mmsenti.cli import main

    tmp = tmp_path_factory.mktemp("plugin")
    argv = ["train", "--out", str(tmp / "run"), "--quiet", "--set", f"run.cache_dir={tmp / 'cache'}"]
    assert main(argv + [x for o in TRAIN for x in ("--set", o)]) == 0
    return tmp / "run"


def test_the_entry_point_registers_the_model_and_its_input_kind(plugin):
    assert "trigram-fusion" in MODELS.names() and "char-trigrams" in INPUTS.names()
    assert MODELS.get("trigram-fusion").description.endswith("(a plugin model)")


def test_the_plugin_model_trains_saves_loads_and_predicts(run):
    from mmsenti.data.scenes import make_sample
    from mmsenti.inference import load_model
    from mmsenti.models.folder import ModelFolder

    meta = json.loads((run / "model" / "preprocessing.json").read_text())
    assert [(b["kind"], b["state"]) for b in meta["builders"]][0] == ("char-trigrams",
                                                                      {"buckets": 512, "max_trigrams": 96})
    assert any((run.parent / "cache").iterdir())  # the frozen CNN's features were cached
    predictor = load_model(run)
    s = make_sample(1, "test", seed=3, image_size=48)
    pred = predictor.predict(s.text, s.image)
    assert pred.label in predictor.label_names and sum(pred.probabilities.values()) == pytest.approx(1, abs=1e-5)
    folder = ModelFolder.open(run)
    again = folder.load_model()
    batch = folder.processor([s], training=False)
    assert set(batch) >= {"trigram_ids", "trigram_mask", "pixel_values"}
    with torch.no_grad():
        torch.testing.assert_close(again(batch)["logits"], predictor.model(batch)["logits"], rtol=0, atol=0)


def test_the_plugin_model_explains(run):
    from mmsenti.data.scenes import make_sample
    from mmsenti.inference import load_model

    pytest.importorskip("captum")
    predictor = load_model(run)
    s = make_sample(2, "test", seed=3, image_size=48)
    ex = predictor.explain(s.text, s.image, ig_steps=16)
    assert set(ex.modality.effects) == {"text", "image", "interaction"}
    assert ex.image_attribution is not None and ex.image_attribution.region_map.shape == ex.grid
    assert ex.text_attribution is None  # no word pieces: its text is read as trigrams
    assert ex.prediction == predictor.predict(s.text, s.image).to_dict(exclude=("id",))


def test_the_plugin_model_exports_with_parity(run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from mmsenti.data.scenes import make_sample
    from mmsenti.export import export_onnx
    from mmsenti.export.exporter import check_export
    from mmsenti.inference import load_model

    out, meta = export_onnx(run, tmp_path / "onnx", parity_posts=24)
    assert [i["name"] for i in meta["inputs"]] == ["trigram_ids", "trigram_mask", "pixel_values"]
    assert meta["parity"]["fp32"]["agreement"] == 1.0 and meta["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    assert meta["parity"]["fp32"]["metric"]["posts"] == 24  # the dev split, through the plugin's builder
    assert check_export(out)[1] == []
    torch_pred, onnx_pred = load_model(run), load_model(out, backend="onnx")
    posts = [make_sample(i, "test", seed=4, image_size=48) for i in range(5)]
    for a, b in zip(torch_pred.predict_samples(posts), onnx_pred.predict_samples(posts), strict=True):
        assert a.label == b.label and a.probabilities == pytest.approx(b.probabilities, abs=1e-5)


def test_the_plugin_model_serves(run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmsenti.data.scenes import make_sample
    from mmsenti.inference import load_model
    from mmsenti.serve import ServeSettings, create_app

    s = make_sample(5, "test", seed=3, image_size=48)
    buf = io.BytesIO()
    s.image.save(buf, format="PNG")
    ref = load_model(run).predict(s.text, s.image)
    with TestClient(create_app(run, ServeSettings(api_key=None))) as client:
        card = client.get("/v1/model").json()
        assert card["model"] == "trigram-fusion" and card["backbones"] == {"text": "char-trigrams/512",
                                                                           "image": "small-cnn"}
        r = client.post("/v1/predict", json={"text": s.text, "image": base64.b64encode(buf.getvalue()).decode()})
        assert r.status_code == 200, r.text
        got = r.json()["predictions"][0]
    assert got["label"] == ref.label and got["probabilities"] == pytest.approx(ref.probabilities, abs=2e-6)


def test_a_plugin_that_fails_to_import_is_named_in_one_line_and_the_others_stay(monkeypatch, caplog):
    monkeypatch.setattr(importlib.metadata, "entry_points", _entry_points(("broken", "no_such_module_xyz")))
    try:
        with caplog.at_level(logging.WARNING, logger="mmsenti.registry"):
            assert load_plugins(ENTRY_POINT_GROUP, again=True) == []
        line = ("plugin 'broken' (no_such_module_xyz) of mmsenti.models failed to load: ModuleNotFoundError: "
                "No module named 'no_such_module_xyz'")
        assert [r.getMessage() for r in caplog.records] == [line]
        assert {"late-fusion", "infig", "rahp"} <= set(MODELS.names())  # the built-in models are all there
        with pytest.raises(RegistryError, match="unknown model 'broken-model'.*plugin 'broken'"):
            MODELS.get("broken-model")
    finally:
        BROKEN_PLUGINS[ENTRY_POINT_GROUP].pop("broken", None)
