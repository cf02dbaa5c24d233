"""The ``tags`` image encoder: a post's tags (HFM's attribute words, TumEmo's detected ids, a user's list) as the
image's tokens, read by every model that reads an image."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny

from mmsenti.config import InputSpec, load_config
from mmsenti.data.base import Sample
from mmsenti.data.inputs import BuildContext, TagsInput, normalize_tag, tag_bucket
from mmsenti.data.scenes import KINDS, ScenesConfig, build_scenes
from mmsenti.errors import DataError


def _samples(*tag_lists):
    return [Sample(id=str(i), label=0, text="a post", tags=t) for i, t in enumerate(tag_lists)]


def _build(builder, samples, **ctx):
    batch = {}
    builder.build(samples, batch, BuildContext(samples, **ctx))
    return batch


def test_learned_tags_are_stable_hash_buckets_padded_and_cut_to_max_tags():
    b = TagsInput(InputSpec("tags", "image", options={"embedding": "learned"}), max_tags=3, pieces=1, buckets=97)
    batch = _build(b, _samples(["Man", "  sign  board", "wearing", "hat"], [], ["man"]))
    assert batch["tag_ids"].shape == batch["tag_mask"].shape == (3, 3, 1)
    assert batch["tag_mask"][:, :, 0].tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert batch["tag_ids"][0, :, 0].tolist() == [tag_bucket(t, 97) for t in ("man", "sign board", "wearing")]
    assert batch["tag_ids"][2, 0, 0] == batch["tag_ids"][0, 0, 0]  # case and spacing do not make another tag
    assert (batch["tag_ids"][batch["tag_mask"] == 0] == 0).all() and 1 <= tag_bucket("x" * 500, 97) < 97
    assert normalize_tag("A  Tag\n") == "a tag"


def test_word_tags_are_their_word_pieces_and_encoder_tags_are_framed_as_sentences():
    cfg = load_config(None, ["model.name=late-fusion-tiny", "model.image_encoder.name=tags",
                             "model.image_encoder.tag_embedding=vocab", "model.image_encoder.tag_pieces=3"])
    from mmsenti.data.inputs import TokensInput

    tokens = TokensInput.create(cfg.model, InputSpec("tokens", "text"), ["a sunny day with snow and rain"], [])
    vocab = TagsInput.create(cfg.model, cfg.model.image_input(), [], [tokens])
    tok = tokens.tokenizer
    batch = _build(vocab, _samples(["sunny", "snow rain day with"]))
    assert batch["tag_ids"][0, 0, :1].tolist() == tok("sunny", add_special_tokens=False)["input_ids"][:1]
    assert batch["tag_mask"][0].tolist() == [[1, 0, 0], [1, 1, 1]] + [[0, 0, 0]] * 6  # pieces cut at 3; max_tags 8
    assert batch["tag_ids"][0, 1].tolist() == tok("snow rain day with", add_special_tokens=False)["input_ids"][:3]
    enc_spec = InputSpec("tags", "image", options={"embedding": "encoder"})
    enc = TagsInput(enc_spec, max_tags=2, pieces=3, buckets=2, tokenizer=tok)
    ids = _build(enc, _samples(["snow rain day with"]))["tag_ids"][0, 0].tolist()
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id  # cut inside, the frame kept


def test_a_post_without_tags_is_an_error_naming_it_unless_missing_modalities_are_allowed():
    b = TagsInput(InputSpec("tags", "image"), max_tags=2, pieces=1, buckets=10)
    with pytest.raises(DataError, match="sample 1: no tags"):
        _build(b, _samples(["a"], None))
    batch = _build(b, _samples(["a"], None, []), allow_missing=True)
    assert batch["image_present"].tolist() == [True, False, False]


@pytest.mark.parametrize("embedding", ["learned", "vocab", "encoder"])
@pytest.mark.parametrize("name", ["infig", "late-fusion", "rahp"])
def test_tag_order_and_padding_do_not_change_a_models_answer(name, embedding):
    """Tags are a set: permuting a post's tags, or what sits in its padding slots, leaves every model's logits
    as they were (no position embedding, padding masked in every layer), while another tag changes them."""
    bundle = build_scenes(ScenesConfig(num_train=16, num_dev=4, num_test=4, tags=True))
    _, model, proc = build_tiny(name, bundle, "model.image_encoder.name=tags",
                                f"model.image_encoder.tag_embedding={embedding}", "model.image_encoder.max_tags=7")
    posts = bundle.split("train")[:4]
    if name == "rahp":  # its memory bank: the training posts (retrieval across text and tags)
        model.refresh_bank([proc(bundle.split("train"), training=False)])
    model.eval()
    with torch.no_grad():
        base = model(proc(posts, training=False))["logits"]
        shuffled = [Sample(s.id, s.label, s.text, tags=list(reversed(s.tags))) for s in posts]
        torch.testing.assert_close(model(proc(shuffled, training=False))["logits"], base, rtol=0, atol=1e-5)
        batch = proc(posts, training=False)
        pad = batch["tag_mask"] == 0
        batch["tag_ids"] = torch.where(pad, torch.randint_like(batch["tag_ids"], 1, 50), batch["tag_ids"])
        torch.testing.assert_close(model(batch)["logits"], base, rtol=0, atol=1e-5)
        other = [Sample(s.id, s.label, s.text, tags=[*s.tags[:-1], "volcano"]) for s in posts]
        assert not torch.allclose(model(proc(other, training=False))["logits"], base, atol=1e-4)


def test_vocab_tags_are_the_mean_of_their_frozen_piece_embeddings():
    bundle = build_scenes(ScenesConfig(num_train=16, num_dev=4, num_test=4, tags=True))
    _, model, proc = build_tiny("late-fusion", bundle, "model.image_encoder.name=tags",
                                "model.image_encoder.tag_embedding=vocab", "model.modalities=[image]")
    enc = model.image_encoder
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    batch = proc(bundle.split("train")[:3], training=False)
    out = enc.encode_batch(batch)
    table = enc.table.weight
    for i in range(3):
        for j in range(batch["tag_mask"].shape[1]):
            pieces = batch["tag_ids"][i, j][batch["tag_mask"][i, j] == 1]
            want = table[pieces].mean(0) if len(pieces) else torch.zeros(table.shape[1])
            torch.testing.assert_close(out.hidden_states[0][i, j], want)
    assert out.attention_mask.tolist() == batch["tag_mask"].amax(-1).tolist()
    cached = enc.compute_cached_batch(batch)  # the frozen tags go through the feature cache like a frozen CNN map
    again = enc.encode_batch({**{k: v for k, v in batch.items() if k != "tag_ids"}, **cached})
    torch.testing.assert_close(again.hidden_states[0], out.hidden_states[0])


def test_a_tags_model_learns_what_the_tags_say_saves_loads_and_predicts(scenes_tags):
    """On scenes the label needs the text and the weather shown: the tags carry the weather, so text + tags reach
    100 % where either alone is at chance (README). Saved, loaded and asked with a post's tags, it answers."""
    from mmsenti import load_model

    metrics = json.loads((scenes_tags / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.95
    predictor = load_model(scenes_tags / "model")
    text = "really hoping for sunny skies for the picnic, please, not a downpour"
    answers = {k: predictor.predict(text, tags=["tree", *{"sun": ["sunny"], "rain": ["umbrella"],
                                                          "snow": ["snowflake"]}[k]]).label for k in KINDS}
    assert answers == {"sun": "positive", "rain": "negative", "snow": "neutral"}
    with pytest.raises(DataError, match="no tags"):
        predictor.predict(text)
    prep = json.loads((scenes_tags / "model" / "preprocessing.json").read_text())
    assert [b["kind"] for b in prep["builders"]] == ["tokens", "tags"]


def test_training_without_tags_in_the_data_says_how_to_get_them(tmp_path):
    from mmsenti.cli import main

    argv = ["train", "--config", "configs/quickstart.yaml", "--out", str(tmp_path / "r"), "--quiet",
            "--set", "model.image_encoder.name=tags", "--set", "model.name=late-fusion-tiny"]
    assert main(argv) == 2


@pytest.mark.parametrize("embedding", ["vocab", "encoder"])
@pytest.mark.parametrize("name", ["infig", "late-fusion", "rahp"])
def test_frozen_tags_come_from_the_feature_cache_with_the_same_answers(name, embedding, tmp_path):
    """The frozen tag embeddings are cached per post like a frozen CNN map: every model with a frozen tags encoder
    keys, builds and reads the cache (no tag ids in its batches then), and answers as without it."""
    from mmsenti.train.cache import CachedCollator, open_or_build

    bundle = build_scenes(ScenesConfig(num_train=12, num_dev=4, num_test=4, tags=True))
    _, model, proc = build_tiny(name, bundle, "model.image_encoder.name=tags",
                                f"model.image_encoder.tag_embedding={embedding}")
    posts = bundle.split("train")
    if name == "rahp":
        model.refresh_bank([proc(posts, training=False)])
    model.eval()
    assert "cached_tag_states" in model.cache_spec() and "tag_ids" in model.cache_replaces()
    store = open_or_build(tmp_path, model, proc, posts)
    batch = CachedCollator(proc, store, model.cache_replaces())(posts[:5])
    assert "tag_ids" not in batch and "cached_tag_states" in batch
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["logits"], model(proc(posts[:5]))["logits"], rtol=0, atol=1e-5)
