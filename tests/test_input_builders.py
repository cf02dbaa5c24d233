"""The processor composes the input builders a model declares; ``preprocessing.json`` lists them, and a model folder
(or a training run's processor) written before input builders existed still loads and gives identical batches and
predictions."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from mmsenti.config import load_config
from mmsenti.data.inputs import ClipInput
from mmsenti.data.processing import Processor
from mmsenti.errors import ModelFileError
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import build_processor
from mmsenti.models.folder import ModelFolder, write_manifest
from mmsenti.train.workbench import build_dataset

TINY = ["data.num_train=32", "data.num_dev=8", "data.num_test=8", "data.image_size=32",
        "model.text_encoder.width=16", "model.text_encoder.num_layers=1", "model.text_encoder.num_heads=2",
        "model.text_encoder.vocab_size=200", "model.image_encoder.width=8", "model.image_encoder.image_size=32"]
MOSI = ["data.name=synthetic-mmsa", "data.n_train=32", "data.n_valid=8", "data.n_test=8", "model.name=rahp",
        "model.width=16", "model.heads=2", "model.hidden=16", "model.k=4", "model.num_prompts=2"]
CASES = {
    "late-fusion": TINY,
    "infig": TINY + ["model.name=infig", "model.width=16", "model.image_layers=1", "model.image_heads=2",
                     "model.fusion_layers=1", "model.fusion_heads=2", "model.clip_dim=8", "model.queue_size=8",
                     "model.hfam_layers=1"],
    "rahp-features": MOSI + ["model.modalities=[text, audio]", "model.text_input=features",
                             "model.feature_dims={text: 32, audio: 16}"],
    "rahp-tokens-audio": MOSI + ["model.modalities=[text, audio]", "model.feature_dims={audio: 16}",
                                 "model.text_encoder.width=16", "model.text_encoder.num_layers=1",
                                 "model.text_encoder.num_heads=2", "model.text_encoder.vocab_size=200"],
}


def write_format_1(processor: Processor, directory, with_inputs: bool = True) -> None:
    """``preprocessing.json`` as mmsenti wrote it before input builders (its tokenizer folders are unchanged)."""
    clip = next((b for b in processor.builders if isinstance(b, ClipInput)), None)
    meta = {"modalities": processor.modalities, "max_length": processor.max_length or 40, "task": processor.task,
            "image_transform": asdict(processor.image_transform) if processor.image_transform else None,
            "clip_transform": asdict(clip.transform) if clip else None,
            "clip_max_length": clip.tokenizer.max_length if clip else 77,
            "feature_modalities": processor.feature_modalities}
    if with_inputs:
        meta["inputs"] = processor.inputs
    (directory / "preprocessing.json").write_text(json.dumps(meta, indent=2) + "\n")


def _saved(name: str, directory):
    cfg = load_config(None, CASES[name])
    data = build_dataset(cfg)
    info = TaskInfo(data.task, data.label_names)
    processor = build_processor(cfg.model, [s.text or "" for s in data.split("train")], info.task)
    torch.manual_seed(0)
    model = build_model(cfg.model, info, processor)
    if hasattr(model, "refresh_bank"):
        train = data.split("train")
        model.refresh_bank([processor(train[i:i + 16], training=False) for i in range(0, len(train), 16)])
    ModelFolder.save(directory / "model", model.eval(), processor, cfg)
    processor.save(directory / "processor")  # a training run's (with the training-only inputs)
    return cfg, data, processor


@pytest.mark.parametrize("with_inputs", [True, False], ids=["keys-by-mode", "older"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_folder_written_before_input_builders_loads_and_predicts_the_same(name, with_inputs, tmp_path):
    cfg, data, processor = _saved(name, tmp_path)
    test, train = data.split("test"), data.split("train")[:4]
    new = ModelFolder.open(tmp_path / "model")
    with torch.no_grad():
        want = new.load_model()(new.processor(test, training=False))["logits"]
    write_format_1(processor.for_inference(), tmp_path / "model", with_inputs)
    write_manifest(tmp_path / "model")
    old = ModelFolder.open(tmp_path / "model")

    def specs(p: Processor) -> list:  # (the older format kept no order: text first, as it built batches then)
        return sorted((b.spec for b in p.builders), key=repr)

    assert specs(old.processor) == specs(new.processor)
    with torch.no_grad():
        got = old.load_model()(old.processor(test, training=False))["logits"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # A training run's processor (resume), with its training-only inputs (INFIG's CLIP tokenizer and transform).
    write_format_1(processor, tmp_path / "processor", with_inputs)
    resumed = Processor.load(tmp_path / "processor", cfg.model)
    assert specs(resumed) == specs(processor)
    for mode in (True, False):
        a, b = processor(train, training=mode), resumed(train, training=mode)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_preprocessing_lists_its_builders_and_an_unknown_kind_is_one_line(tmp_path):
    cfg, data, processor = _saved("infig", tmp_path)
    meta = json.loads((tmp_path / "processor" / "preprocessing.json").read_text())
    assert [(b["kind"], b["modality"], b["training_only"]) for b in meta["builders"]] == [
        ("tokens", "text", False), ("pixels", "image", False), ("clip", None, True)]
    assert processor.files() == ["preprocessing.json", "tokenizer", "clip_tokenizer"]
    assert ModelFolder.open(tmp_path / "model").processor.files() == ["preprocessing.json", "tokenizer"]
    meta["builders"][1]["kind"] = "hologram"
    (tmp_path / "processor" / "preprocessing.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="reads an input this installation does not know.*unknown input "
                                             "'hologram'.*install the package"):
        Processor.load(tmp_path / "processor")


def test_keys_the_cache_supplies_are_not_built(tmp_path):
    _, data, processor = _saved("infig", tmp_path)
    posts = data.split("train")[:3]
    full = processor(posts)
    part = processor(posts, without={"pixel_values", "clip_pixel_values", "clip_input_ids"})
    assert set(full) - set(part) == {"pixel_values", "clip_pixel_values", "clip_input_ids", "clip_attention_mask"}
    assert torch.equal(part["input_ids"], full["input_ids"])
