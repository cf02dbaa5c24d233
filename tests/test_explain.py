"""Explanations: word pieces → words, region maps that point at the right region (constructed INFIG), the region
grid mapped back onto images of any aspect ratio, what a trained scenes model's attributions say, unimodal models'
exact zeros, RAHP's neighbours (exactly those of the forward pass), the CLI's figures, the service and the web page.

Two models trained on small scenes data, late fusion once per session (conftest) and INFIG once for this module
(~15 s and ~22 s on one core); both reach 100 % test accuracy, so what their explanations say about the scenes rule can be checked.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from serving_fixtures import TINY_INFIG, browser, save_tiny_model, serving, submit_post

from mmsenti.config import load_config
from mmsenti.data.base import Sample
from mmsenti.data.processing import ImageTransform, train_wordpiece_tokenizer
from mmsenti.data.scenes import _DREAD_WORDS, _HOPE_WORDS, ScenesConfig, build_scenes, make_sample
from mmsenti.explain import ExplainOptions
from mmsenti.explain.attribution import sum_over_cells
from mmsenti.explain.figures import PANEL, figures_for, panel_count
from mmsenti.explain.maps import attention_rollout, region_boxes, word_region_attention
from mmsenti.explain.text import pool_words, words_of
from mmsenti.inference import Predictor, load_model
from mmsenti.models.infig.alignment import fine_grained_similarity, token_similarity
from mmsenti.train.trainer import Trainer

SCENES = ["data.num_train=1200", "data.num_dev=50", "data.num_test=50", "data.batch_size=32", "run.quiet=true",
          "run.log_every=1000", "optim.epochs=10"]
INFIG = ["model.name=infig-tiny", "model.image_encoder.num_stages=3", "model.fusion_layers=2", "model.use_clip=false",
         "model.use_gam=false", "model.dropout=0.0", "model.lambda_f=0.05", "optim.lr=2e-3"]
STOP = {"a", "the", "some", "day"}  # in the weather phrases, but not about the weather
WEATHER = {w for d in (_HOPE_WORDS, _DREAD_WORDS) for phrases in d.values() for p in phrases for w in p.split()} - STOP
N_POSTS = 60


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and one thread is immune to a busy machine's other jobs (two
    threads waiting for each other at every op made training here 15x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scenes_late_fusion):
    """Run directories of a late-fusion (the session's, conftest) and an INFIG model trained on scenes (both 100 %
    on their test split)."""
    runs = {"late-fusion": scenes_late_fusion, "infig": tmp_path_factory.mktemp("infig")}
    results = Trainer(load_config(None, SCENES + INFIG), runs["infig"]).fit()
    for name, run in runs.items():
        accuracy = json.loads((run / "metrics.json").read_text())["test"]["accuracy"] if name != "infig" else \
            results["test"]["accuracy"]
        assert accuracy >= 0.9, (name, accuracy)
    return runs


@pytest.fixture(scope="module")
def infig(trained):
    return load_model(trained["infig"])


# ------------------------------------------------------------------------------------------------ words
def test_word_pieces_merge_into_one_row_and_special_tokens_never_appear():
    # A vocabulary of single characters only: every word is split into one piece per character.
    text = "Sunshine, please! not drizzle"
    tok = train_wordpiece_tokenizer([text], vocab_size=0, max_length=64)
    words = words_of(tok, text, 64)
    assert [w.text for w in words] == ["Sunshine", ",", "please", "!", "not", "drizzle"]
    assert [len(w.tokens) for w in words] == [8, 1, 6, 1, 3, 7]
    ids = tok(text)["input_ids"]
    pieces = [p for w in words for p in w.tokens]
    assert pieces == list(range(1, len(ids) - 1))  # every piece once, [CLS] (0) and [SEP] (last) never
    assert all(text[w.start:w.end] == w.text for w in words)
    # In a padded batch the words are the same and never reach into the padding.
    batch = tok([text, text + " and more words here"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id
    assert words_of(tok, text, 64, batch["input_ids"][0]) == words
    # Truncation: words cut off are not listed, the last kept word keeps only its read pieces.
    assert [(w.text, w.tokens) for w in words_of(tok, text, 10)] == [("Sunshine", list(range(1, 9)))]
    assert [(w.text, w.tokens) for w in words_of(tok, text, 8)] == [("Sunshi", list(range(1, 7)))]
    glued = "I can't wait #weekend, well-known :)"
    tok2 = train_wordpiece_tokenizer([glued], vocab_size=0, max_length=64)
    assert [w.text for w in words_of(tok2, glued, 64)] == ["I", "can't", "wait", "#weekend", ",", "well-known", ":",
                                                           ")"]
    values = np.arange(len(ids), dtype=float)
    assert pool_words(values, words, "sum")[0] == sum(range(1, 9))
    assert pool_words(values, words, "mean")[5] == np.mean(words[5].tokens)


def test_real_tokenizer_word_pieces():
    from mmsenti.backbones import load_tokenizer
    from mmsenti.backbones.weights import MissingWeightsError

    try:
        tok = load_tokenizer("minilm-l6", True)
    except MissingWeightsError:
        pytest.skip("MiniLM-L6's tokenizer is not installed")
    text = "Hoping for a cosy drizzle, anything but snowdrifts"
    words = words_of(tok, text, 128)
    assert [w.text for w in words] == ["Hoping", "for", "a", "cosy", "drizzle", ",", "anything", "but", "snowdrifts"]
    assert any(len(w.tokens) > 1 for w in words)  # the uncased WordPiece vocabulary splits some of these


# ------------------------------------------------------------------------------------------ pure functions
def test_token_similarity_is_what_fine_grained_similarity_averages():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(3, 6, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    sim = token_similarity(img, txt, mask)
    assert sim.shape == (3, 5, 6) and torch.all(sim[1, 3:] == 0)
    _, s_q2p = fine_grained_similarity(img, txt, mask, top_j=2)
    for b in range(3):  # S_q2p of the pair = mean over real text tokens of their top-2 mean over the regions
        real = sim[b, mask[b].bool()]
        torch.testing.assert_close(real.topk(2, dim=-1).values.mean(), s_q2p[b, b])


def test_attention_rollout_and_word_maps():
    rng = np.random.default_rng(0)
    layers = [rng.random((2, 7, 7)) for _ in range(3)]
    layers = [a / a.sum(-1, keepdims=True) for a in layers]
    roll = attention_rollout(layers, residual=0.5)
    expected = np.eye(7)
    for a in layers:  # naive: per layer, mean over heads, add the residual, renormalise, compose
        m = 0.5 * np.eye(7) + 0.5 * a.mean(0)
        expected = (m / m.sum(-1, keepdims=True)) @ expected
    np.testing.assert_allclose(roll, expected)
    np.testing.assert_allclose(roll.sum(-1), 1.0)
    np.testing.assert_allclose(attention_rollout(layers[:1], residual=0.0), layers[0].mean(0))
    # Fusion sequence [img CLS, 2x2 regions, text CLS, w, w, SEP]: a word whose pieces attend to region (1, 0).
    from mmsenti.explain.results import Word

    att = np.full((9, 9), 1 / 9)
    att[6:8] = 0.0
    att[6:8, 1 + 2] = 1.0  # region index 2 = row 1, col 0
    maps, share = word_region_attention(att, [Word("w", 0, 1, [1, 2])], num_image_tokens=5, grid=(2, 2))
    assert maps.shape == (1, 2, 2) and np.unravel_index(maps[0].argmax(), (2, 2)) == (1, 0)
    assert share[0] == pytest.approx(1.0)


def test_sum_over_cells_matches_a_loop():
    v = np.random.default_rng(1).random((10, 7))
    out = sum_over_cells(v, (3, 2))
    ref = np.zeros((3, 2))
    for r in range(10):
        for c in range(7):
            ref[r * 3 // 10, c * 2 // 7] += v[r, c]
    np.testing.assert_allclose(out, ref)
    assert out.sum() == pytest.approx(v.sum())


@pytest.mark.parametrize("resize, crop_pct", [("squash", 1.0), ("shorter", 1.0), ("shorter", 0.875)])
@pytest.mark.parametrize("size", [(120, 60), (50, 90)])
def test_source_box_maps_the_model_input_back_onto_the_image(resize, crop_pct, size):
    """A dot drawn in the original lands where source_box says, after the real resize (+ crop) transform."""
    t = ImageTransform(size=40, mean=[0, 0, 0], std=[1, 1, 1], resize=resize, crop_pct=crop_pct)
    w, h = size
    box = t.source_box(w, h)
    if resize == "squash":
        assert box == (0, 0, w, h)
    else:  # a centre square of the image
        assert box[2] - box[0] == pytest.approx(box[3] - box[1], rel=0.03)
        # centred up to the crop's integer offset (half a resized pixel)
        assert box[0] + box[2] == pytest.approx(w, abs=2) and box[1] + box[3] == pytest.approx(h, abs=2)
    for fx, fy in ((0.5, 0.5), (0.55, 0.35), (0.4, 0.62)):
        img = Image.new("RGB", size, "black")
        x, y = fx * w, fy * h
        ImageDraw.Draw(img).ellipse([x - 2, y - 2, x + 2, y + 2], fill="white")
        px = t(img)[0].numpy()
        r, c = np.unravel_index((px * (px > 0.5)).argmax(), px.shape)
        # the input pixel (r, c) seen in the original, through the box
        ox = box[0] + (c + 0.5) / 40 * (box[2] - box[0])
        oy = box[1] + (r + 0.5) / 40 * (box[3] - box[1])
        assert abs(ox - x) <= 2.5 * (box[2] - box[0]) / 40 + 1 and abs(oy - y) <= 2.5 * (box[3] - box[1]) / 40 + 1


def test_region_boxes_tile_the_box():
    boxes = region_boxes((2, 3), (30.0, 0.0, 90.0, 60.0))
    assert boxes.shape == (2, 3, 4)
    np.testing.assert_allclose(boxes[1, 2], (70, 30, 90, 60))
    np.testing.assert_allclose(boxes[0, 0], (30, 0, 50, 30))


# --------------------------------------------------------------------------- constructed INFIG: right region
def test_region_maps_of_a_constructed_infig_point_at_the_right_region(tmp_path):
    """Image tokens one-hot by region, the word 'rain' one-hot at region (1, 3) and 'snow' at (3, 0), every other
    token on a dimension no region has, and fusion attention that follows dot products: every source must point
    each word at its region, and the figure must draw it there on a 120x60 image cut by a centre crop."""
    pred = load_model(save_tiny_model(tmp_path / "m", TINY_INFIG + ["model.image_encoder.num_stages=3",
                                                                      "model.fusion_layers=1"]))
    model = pred.model
    rows, cols = model.image_encoder.grid_size
    assert (rows, cols) == (4, 4)
    d = model.config.width
    text = "rain or snow at the parade"
    ids = pred.processor([Sample("0", None, text, None)], load_images=False, training=False)["input_ids"]
    words = words_of(pred.processor.tokenizer, text, pred.processor.max_length)
    target = {"rain": 1 * cols + 3, "snow": 3 * cols + 0}

    def encode(batch, suffix=""):
        b = batch["pixel_values"].shape[0]
        img = torch.zeros(b, 1 + rows * cols, d)
        img[:, 0, d - 2] = 1.0  # image [CLS]
        img[:, 1:, : rows * cols] = torch.eye(rows * cols)
        txt = torch.zeros(b, ids.shape[1], d)
        txt[:, :, d - 1] = 1.0
        for w in words:
            if w.text in target:
                txt[:, w.tokens, d - 1] = 0.0
                txt[:, w.tokens, target[w.text]] = 1.0
        return [img], [txt], torch.ones(b, ids.shape[1], dtype=torch.long), None  # every image token real

    model._encode = encode
    with torch.no_grad():  # queries = keys = 20·LayerNorm(x): attention follows the one-hot index
        block = model.fusion[0]
        block.attn.in_proj_weight.copy_(torch.cat([20 * torch.eye(d), 20 * torch.eye(d), torch.eye(d)]))
        block.attn.in_proj_bias.zero_()
        model.type_embed.zero_()
    pred.processor.image_transform = ImageTransform(size=32, resize="shorter", crop_pct=1.0)
    image = Image.new("RGB", (120, 60), "gray")
    ex = pred.explain(text, image, integrated_gradients=False, select=("rain", "snow"), sources=("similarity",
                                                                                                "attention", "rollout"))
    assert ex.grid == (4, 4) and ex.image_size == (120, 60) and ex.image_box == (30.0, 0.0, 90.0, 60.0)
    names = ex.word_texts
    for source in ("similarity", "attention", "rollout"):
        for word, idx in target.items():
            m = ex.region_maps[source].maps[names.index(word)]
            assert np.unravel_index(m.argmax(), m.shape) == divmod(idx, cols), (source, word)
    assert ex.region_maps["similarity"].maps[names.index("rain")].max() == pytest.approx(1.0)
    # Drawn where the model looked: region (1, 3) of the crop is x 75..90, y 15..30 of the original.
    np.testing.assert_allclose(region_boxes(ex.grid, ex.image_box)[1, 3], (75, 15, 90, 30))
    fig = figures_for(ex, image, sources=("similarity", "rollout"))["word_regions"]
    assert panel_count(fig) == 2 * 3
    heat = [ax for ax in fig.axes if ax.get_label() == PANEL][1].images[1]
    assert heat.get_extent() == [30.0, 90.0, 60.0, 0.0]  # the crop box, image coordinates (y down)


# ------------------------------------------------------------------------------------- trained on scenes
@pytest.mark.slow
@pytest.mark.parametrize("name", ["late-fusion", "infig"])
def test_trained_scenes_model_explanations_follow_the_rule(trained, name, record_property):
    """Scenes' label is hope/dread words × the weather shown: both modalities must matter, and the text
    attribution must rank the weather words above the rest (templates, outings, filler)."""
    pred = load_model(trained[name])
    opts = ExplainOptions(ig_steps=32)
    top_weather = mean_above = changed_text = changed_image = 0
    effects = []
    for i in range(N_POSTS):
        s = make_sample(i, "test", 0, 64)
        ex = pred.explain(s.text, s.image, options=opts)
        assert ex.prediction["label"] == pred.predict(s.text, image=s.image)["label"]
        words = [w.lower() for w in ex.word_texts]
        score = np.abs(ex.text_attribution.word_scores)
        weather = np.array([w in WEATHER for w in words])
        assert weather.any() and (~weather).any()
        top_weather += bool(weather[score.argmax()])
        mean_above += bool(score[weather].mean() > score[~weather].mean())
        changed_text += ex.modality.changes_prediction["text"]
        changed_image += ex.modality.changes_prediction["image"]
        effects.append([ex.modality.effects["text"], ex.modality.effects["image"]])
    figures = {"top word is a weather word": top_weather / N_POSTS,
               "weather words above the rest (mean |IG|)": mean_above / N_POSTS,
               "replacing the text changes the label": changed_text / N_POSTS,
               "replacing the image changes the label": changed_image / N_POSTS}
    record_property("explain_figures", json.dumps(figures))
    print(name, figures)
    assert figures["top word is a weather word"] >= 0.8 and figures["weather words above the rest (mean |IG|)"] >= 0.8
    assert figures["replacing the text changes the label"] > 0.5
    assert figures["replacing the image changes the label"] > 0.5
    assert np.mean(effects, 0).min() > 0.2  # on average both modalities carry a large share of p(label)


@pytest.mark.parametrize("name, other", [("text-only", "image"), ("image-only", "text")])
def test_unimodal_models_give_the_other_modality_exactly_zero(tmp_path, name, other):
    pred = load_model(save_tiny_model(tmp_path / name, [f"model.name={name}-tiny"]))
    own = "text" if other == "image" else "image"
    moved = 0
    for i in range(6):
        s = make_sample(i, "test", 3, 48)
        ex = pred.explain(s.text, s.image, ig_steps=8)
        assert ex.modality.effects[other] == 0.0 and ex.modality.changes_prediction[other] is False
        assert ex.modality.effects["interaction"] == 0.0
        assert ex.modality.values[f"without_{other}"] == ex.modality.values["full"]
        moved += ex.modality.effects[own] != 0.0
        assert (ex.text_attribution is None) == (own == "image") and (ex.image_attribution is None) == (own == "text")
    assert moved == 6  # its own modality does move the output


def test_integrated_gradients_are_complete_and_the_baselines_are_as_stated(infig):
    s = make_sample(2, "test", 0, 64)
    ex = infig.explain(s.text, s.image, ig_steps=128)
    ta, ia = ex.text_attribution, ex.image_attribution
    # The baselines, computed here independently: Σ attributions − delta = f(input) − f(baseline) exactly (delta is
    # Captum's convergence error), so these are the baselines Captum integrated from.
    model, proc = infig.model, infig.processor
    batch = proc([Sample("0", None, s.text, proc.image_transform(s.image))], training=False)
    target = infig.label_names.index(ex.prediction["label"])

    def p(b):
        with torch.no_grad():
            return model(b)["logits"].softmax(-1)[0, target].item()

    ids = batch["input_ids"]
    pad_words = torch.where((ids == proc.tokenizer.cls_token_id) | (ids == proc.tokenizer.sep_token_id), ids,
                            proc.tokenizer.pad_token_id)
    text_change = p(batch) - p({**batch, "input_ids": pad_words})
    image_change = p(batch) - p({**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])})
    assert ta.token_scores.sum() - ta.delta == pytest.approx(text_change, abs=1e-4)
    assert ia.pixel_map.sum() - ia.delta == pytest.approx(image_change, abs=1e-4)
    # Converged: at 128 steps the attributions add up to the output change within 10 % of it (+ 0.01).
    assert abs(ta.delta) < 0.1 * abs(text_change) + 0.01 and abs(ia.delta) < 0.1 * abs(image_change) + 0.01
    assert ta.token_scores[0] == 0.0 and ta.token_scores[-1] == 0.0  # [CLS], [SEP]: same in the baseline
    assert ia.region_map.sum() == pytest.approx(ia.pixel_map.sum(), rel=1e-5)
    assert ia.region_map.shape == ex.grid
    blurred = infig.explain(s.text, s.image, ig_steps=8, image_baseline="blur")
    assert "blurred" in blurred.image_attribution.baseline
    assert blurred.modality.values["without_image"] != ex.modality.values["without_image"]


# ------------------------------------------------------------------------------------------------- RAHP
@pytest.fixture(scope="module")
def rahp():
    """An untrained text+image rahp whose bank holds scenes posts plus a near-duplicate of post 5 (same text,
    image brightened): retrieval must find both for post 5."""
    from mmsenti.models.base import TaskInfo, build_model
    from mmsenti.models.encoders import build_processor

    cfg = load_config(None, ["model.name=rahp-tiny", "model.width=32", "model.hidden=32"])
    train = build_scenes(ScenesConfig(num_train=40, num_dev=0, num_test=0, image_size=48)).splits["train"]
    s = train[5]
    train.append(Sample("near-dup-5", s.label, s.text, s.image.point(lambda v: min(255, v + 3)), extra=s.extra))
    proc = build_processor(cfg.model, [x.text for x in train], "classification")
    torch.manual_seed(0)
    model = build_model(cfg.model, TaskInfo("classification", ["negative", "neutral", "positive"]), proc)
    model.refresh_bank([proc(train[i:i + 16], training=False) for i in range(0, len(train), 16)])
    return Predictor(model.eval(), proc, cfg), train


def test_rahp_lists_near_duplicates_and_exactly_the_neighbours_of_the_forward_pass(rahp, monkeypatch):
    from mmsenti.retrieval.bank import MemoryBank

    pred, train = rahp
    s = train[5]
    ex = pred.explain(s.text, s.image, neighbour_samples={x.id: x for x in train}, ig_steps=4)
    k = pred.model.config.k
    assert len(ex.neighbours) == 2 * 2 * k  # (text, image) targets × (text, image) indexes × k
    for m in ("text", "image"):
        own = [n for n in ex.neighbours if n.target == m and n.source == m]
        assert {n.id for n in own[:2]} == {s.id, "near-dup-5"} and all(n.similarity > 0.99 for n in own[:2])
    by_id = {x.id: x for x in train}
    assert all(n.text == by_id[n.id].text for n in ex.neighbours)
    assert all(n.label == ["negative", "neutral", "positive"][by_id[n.id].label] for n in ex.neighbours)
    # The same post through a plain forward pass, recording what the bank returned to the model.
    seen = []
    query = MemoryBank.query

    def recording(self, q, source, kk, exclude_rows=None):
        nb = query(self, q, source, kk, exclude_rows)
        seen.append((source, nb))
        return nb

    monkeypatch.setattr(MemoryBank, "query", recording)
    batch = pred.processor([Sample("x", None, s.text, pred.processor.image_transform(s.image))], training=False)
    with torch.no_grad():
        pred.model(batch)
    used = []
    targets = pred.model.modalities
    for source, nb in seen:  # one query per index, holding every target's rows (targets stacked in order)
        for j, target in enumerate(targets):
            for rank in range(k):
                used.append((target, source, pred.model.bank.ids[int(nb.rows[j, rank])], float(nb.scores[j, rank])))
    listed = [(n.target, n.source, n.id, n.similarity) for n in ex.neighbours]
    assert sorted(listed) == sorted(used)
    table = ex.neighbours_table().splitlines()
    assert len(table) == 2 + len(ex.neighbours) and "near-dup-5" in ex.neighbours_table()


def test_rahp_on_feature_sequences_regression():
    """MOSI-like clips (text, audio, vision feature sequences; a score): each modality is replaced by an empty
    sequence, neighbours carry their training scores."""
    from mmsenti.config import Config
    from mmsenti.data.synthetic_mmsa import SyntheticMMSADataConfig, build_synthetic_mmsa
    from mmsenti.explain.core import explain
    from mmsenti.models.base import TaskInfo, build_model
    from mmsenti.models.encoders import build_processor
    from mmsenti.models.rahp import RahpConfig

    torch.manual_seed(0)
    data = build_synthetic_mmsa(SyntheticMMSADataConfig(n_train=64, n_valid=8, n_test=8, n_clusters=8))
    cfg = RahpConfig(text_input="features", feature_dims={"text": 32, "audio": 16, "vision": 24}, width=32, heads=2,
                     hidden=32, k=3, num_prompts=2)
    train = data.split("train")
    proc = build_processor(cfg, [s.text or "" for s in train], "regression")
    model = build_model(cfg, TaskInfo("regression", None), proc)
    model.refresh_bank([proc(train[i:i + 32], training=False) for i in range(0, len(train), 32)])
    pred = Predictor(model.eval(), proc, Config(model=cfg))
    ex = explain(pred, train[3], ExplainOptions(ig_steps=4), {s.id: s for s in train})
    assert set(ex.modality.effects) == {"text", "audio", "vision"} and ex.modality.target is None
    assert set(ex.modality.replaced_by.values()) == {"an empty sequence"}
    assert all(ex.modality.effects[m] != 0.0 for m in ("text", "audio", "vision"))
    assert ex.prediction["score"] == pytest.approx(ex.modality.values["full"], abs=1e-6)
    assert ex.text_attribution is None and ex.image_attribution is None  # no token or pixel inputs
    scores = {s.id: s.label for s in train}
    assert all(n.label == pytest.approx(scores[n.id], abs=1e-5) for n in ex.neighbours)
    assert [n.id for n in ex.neighbours if n.target == n.source == "text"][0] == train[3].id


# --------------------------------------------------------------------------------------------------- CLI
def _panels_in_rows(png_path) -> list[int]:
    """Count the image panels of a figure from its pixels: horizontal bands mostly covered by non-white pixels,
    and in each band the runs of non-white columns at least 40 px wide (colour bars are narrower)."""
    a = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    ink = (a < 245).any(-1)
    rows = ink.mean(1) > 0.5
    counts, y = [], 0
    while y < len(rows):
        if rows[y]:
            start = y
            while y < len(rows) and rows[y]:
                y += 1
            line = ink[(start + y) // 2]
            runs, x = 0, 0
            while x < len(line):
                if line[x]:
                    s = x
                    while x < len(line) and line[x]:
                        x += 1
                    runs += (x - s) >= 40
                else:
                    x += 1
            counts.append(runs)
        y += 1
    return counts


@pytest.mark.slow
def test_explain_command_writes_json_and_figures(trained, tmp_path, capsys):
    from mmsenti.cli import main

    out = tmp_path / "ex"
    assert main(["explain", str(trained["infig"]), "--sample", "test:3", "--out", str(out), "--words", "3",
                 "--ig-steps", "16"]) == 0
    printed = capsys.readouterr().out
    assert "prediction:" in printed and "modalities" in printed
    data = json.loads((out / "explanation.json").read_text())
    assert data["model"] == "infig" and data["image"]["grid"] == [4, 4] and len(data["selected_words"]) == 3
    assert set(data["word_regions"]) == {"similarity", "attention", "rollout"}
    assert np.asarray(data["word_regions"]["rollout"]["maps"]).shape == (len(data["words"]), 4, 4)
    for name, expected in (("word_regions", [4, 4]), ("importance", None), ("attribution", None)):
        with Image.open(out / f"{name}.png") as im:
            im.load()
            panels = int(im.text["mmsenti:panels"])
        assert panels == {"word_regions": 2 * 4, "importance": 2, "attribution": 3}[name]
        if expected:
            assert _panels_in_rows(out / f"{name}.png") == expected
    # A late-fusion model: attribution only; with --text/--image from files.
    img = tmp_path / "post.png"
    s = make_sample(1, "test", 0, 64)
    s.image.save(img)
    assert main(["explain", str(trained["late-fusion"]), "--text", s.text, "--image", str(img), "--out",
                 str(tmp_path / "lf"), "--no-ig"]) == 0
    assert sorted(p.name for p in (tmp_path / "lf").iterdir()) == ["attribution.png", "explanation.json"]
    with Image.open(tmp_path / "lf" / "attribution.png") as im:
        assert im.text["mmsenti:panels"] == "1"  # modality bars only without IG


@pytest.mark.parametrize("argv, message", [
    (["--sample", "test"], "expected SPLIT:INDEX"),
    (["--sample", "test:99999"], "no index 99999"),
    (["--text", "hoping for sun"], "this model reads image: give --image"),
    (["--text", "x", "--image", "missing.png"], "image file not found"),
    (["--sample", "test:0", "--text", "x"], "not both"),
    (["--sample", "test:0", "--layer", "3"], "hfam_layer 3"),
    (["--sample", "test:0", "--ig-steps", "0"], "ig_steps"),
])
def test_explain_command_errors_are_one_line(trained, tmp_path, capsys, argv, message):
    from mmsenti.cli import main

    assert main(["explain", str(trained["infig"]), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmsenti: error: ") and message in err and "Traceback" not in err


# ------------------------------------------------------------------------------ thin and large images
@pytest.fixture(scope="module")
def untrained_infig(tmp_path_factory):
    """An untrained tiny INFIG (word → region figures need no skill)."""
    return save_tiny_model(tmp_path_factory.mktemp("untrained-infig"), TINY_INFIG)


def test_figures_are_bounded_whatever_the_image(untrained_infig):
    """Figures were sized from the image's aspect ratio (panel height = 2 in x h/w): a 1x600 image made figures
    1,200+ inches tall (3.3 GB, 100 s on the CLI), a 1x6000 one 24 GB in the server. Now every figure fits
    MAX_FIGURE_INCHES, no panel is over MAX_PANEL_ASPECT times taller than wide, and the image is drawn from a copy
    of at most MAX_DRAWN_SIDE pixels a side."""
    from mmsenti.explain.figures import MAX_DRAWN_SIDE, MAX_FIGURE_INCHES, MAX_PANEL_ASPECT, word_region_figure

    fig = word_region_figure(np.zeros((6000, 1, 3), np.uint8), (0, 0, 1, 6000), [("rows", np.zeros((4, 2, 2)))],
                             ["a", "b", "c", "d"], "title")
    w, h = fig.get_size_inches()
    assert max(w, h) <= MAX_FIGURE_INCHES and h <= 2.0 * MAX_PANEL_ASPECT + 1.0, (w, h)
    pred = load_model(untrained_infig)
    for size in ((1, 600), (1500, 1200)):
        image = Image.new("RGB", size, (90, 140, 200))
        ex = pred.explain("hoping for sun at the picnic", image, ig_steps=2)
        figs = figures_for(ex, image)
        assert {"word_regions", "importance", "attribution"} <= set(figs)
        for name, fig in figs.items():
            assert max(fig.get_size_inches()) <= MAX_FIGURE_INCHES, (size, name)
            drawn = [im.get_array().shape[:2] for ax in fig.axes for im in ax.get_images()]
            assert drawn and max(max(d) for d in drawn) <= MAX_DRAWN_SIDE, (size, name, drawn)


@pytest.mark.parametrize("size, message", [
    ((1, 600), "image of 1x600 pixels: a side under 8 pixels (the minimum)"),
    ((30, 900), "image of 30x900 pixels: aspect ratio 30.0:1, over the limit of 20:1"),
])
def test_explain_command_refuses_a_thin_image_in_one_line(untrained_infig, tmp_path, capsys, size, message):
    from mmsenti.cli import main

    path = tmp_path / "thin.png"
    Image.new("RGB", size, (200, 30, 30)).save(path)
    assert main(["explain", str(untrained_infig), "--text", "hoping for sun", "--image", str(path),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"mmsenti: error: --image {path}: {message}"
    assert not (tmp_path / "o").exists()


def test_explain_refuses_a_lone_surrogate_in_one_line(untrained_infig, tmp_path, capsys):
    """A byte that is not UTF-8 on the command line arrives as a lone surrogate (``\udcff``)."""
    from mmsenti.cli import main

    path = tmp_path / "post.png"
    make_sample(1, "test", 0, 48).image.save(path)
    assert main(["explain", str(untrained_infig), "--text", "sun \udcff", "--image", str(path),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "mmsenti: error: post cli: its text holds an unpaired UTF-16 surrogate (U+DCFF) at character 4"


# ------------------------------------------------------------------------------------------------ service
def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_explain_route_answers_as_the_predictor(trained, infig):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmsenti.serve import ServeSettings, create_app

    s = make_sample(7, "test", 0, 64)
    body = {"text": s.text, "image": _png_b64(s.image)}
    ref = infig.explain(s.text, s.image, ig_steps=8).to_dict()
    with TestClient(create_app(trained["infig"], ServeSettings(api_key=None))) as c:
        r = c.post("/v1/explain?ig_steps=8&figures=word_regions,attribution", json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["explanation"]["prediction"] == ref["prediction"]
        for key in ("words", "selected_words", "word_importance"):
            assert got["explanation"][key] == ref[key]
        for source, maps in ref["word_regions"].items():
            assert np.allclose(got["explanation"]["word_regions"][source]["maps"], maps["maps"], atol=1e-6)
        assert got["explanation"]["modality"]["effects"] == pytest.approx(ref["modality"]["effects"], abs=1e-6)
        assert got["explanation"]["text_attribution"]["word_scores"] == pytest.approx(
            ref["text_attribution"]["word_scores"], abs=1e-5)
        for name, url in got["figures"].items():
            assert url.startswith("data:image/png;base64,")
            with Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))) as im:
                assert int(im.text["mmsenti:panels"]) == {"word_regions": 10, "attribution": 3}[name]
        r = c.post("/v1/explain?format=png&ig_steps=0", json=body)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-mmsenti-figure"] == "word_regions"
        Image.open(io.BytesIO(r.content)).verify()
        multipart = c.post("/v1/explain?ig_steps=0", data={"text": s.text},
                           files={"image": ("p.png", base64.b64decode(body["image"]), "image/png")})
        assert multipart.status_code == 200 and multipart.json()["explanation"]["prediction"] == ref["prediction"]
        for query, json_body, field in [
            ("figures=bogus", body, "figures"), ("format=gif", body, "format"), ("ig_steps=100000", body, "ig_steps"),
            ("layer=4", body, "layer"), ("source=nope", body, "source[0]"), ("words=-1", body, "words"),
            ("", {"posts": [body, body]}, "posts"), ("", {"text": s.text}, "image"),
            ("", {"text": s.text, "image": "not base64!"}, "image"),
        ]:
            r = c.post(f"/v1/explain?{query}", json=json_body)
            assert 400 <= r.status_code < 500 and r.json()["error"]["field"] == field, (query, r.text)
        assert c.post("/v1/explain?ig_steps=0", json=body).status_code == 200  # still answering
        assert "/v1/explain" in c.get("/openapi.json").json()["paths"]
        assert "registerPanel(explainPanel)" in c.get("/static/explain.js").text


@pytest.mark.browser
@pytest.mark.slow
def test_web_page_shows_the_explanation(trained, tmp_path):
    pytest.importorskip("fastapi")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    s = make_sample(4, "test", 0, 64)
    path = tmp_path / "post.png"
    s.image.save(path)
    driver = browser()
    try:
        with serving(trained["infig"]) as url:
            submit_post(driver, url, s.text, path, explain=True)
            fig = WebDriverWait(driver, 60).until(ec.visibility_of_element_located((By.ID, "figure-word_regions")))
            assert fig.get_attribute("src").startswith("data:image/png;base64,")
            assert driver.execute_script("return arguments[0].naturalWidth", fig) > 100
            effects = driver.find_elements(By.CSS_SELECTOR, "#modality-effects li")
            assert [e.get_attribute("data-modality") for e in effects] == ["text", "image", "interaction"]
    finally:
        driver.quit()
