"""The built-in dataset: deterministic, balanced, and its label needs both modalities."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmsenti.data.scenes import KINDS, LABELS, ScenesConfig, build_scenes, label_for, make_sample


def test_deterministic_and_independent_of_split_size():
    a = make_sample(5, "train", seed=3)
    b = build_scenes(ScenesConfig(num_train=10, num_dev=1, num_test=1, seed=3)).splits["train"][5]
    assert a.text == b.text and a.label == b.label
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert make_sample(5, "train", seed=4).text != a.text or make_sample(5, "train", seed=4).label != a.label


def test_label_rule():
    assert LABELS[label_for("sun", "rain", "sun")] == "positive"
    assert LABELS[label_for("sun", "rain", "rain")] == "negative"
    assert LABELS[label_for("sun", "rain", "snow")] == "neutral"


def test_each_modality_alone_says_nothing_about_the_label():
    samples = [make_sample(i, "train", seed=0) for i in range(3000)]
    labels = Counter(s.label for s in samples)
    assert all(abs(n / 3000 - 1 / 3) < 0.03 for n in labels.values())  # balanced
    # Given the text's (hope, dread) pair, or given the image's weather, the label stays ~uniform.
    for key in ("shown", "pair"):
        groups: dict = {}
        for s in samples:
            k = s.extra["shown"] if key == "shown" else (s.extra["hope"], s.extra["dread"])
            groups.setdefault(k, Counter())[s.label] += 1
        for counts in groups.values():
            total = sum(counts.values())
            assert max(counts.values()) / total < 0.45, (key, counts)
    assert {s.extra["shown"] for s in samples} == set(KINDS)


def test_linear_probes_on_one_modality_stay_at_chance():
    """Bag-of-words text and raw-pixel image classifiers are at chance; their product features are not."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train = [make_sample(i, "train", 0, image_size=16) for i in range(1500)]
    test = [make_sample(i, "test", 0, image_size=16) for i in range(600)]
    y_tr, y_te = [s.label for s in train], [s.label for s in test]
    vec = CountVectorizer(ngram_range=(1, 2)).fit([s.text for s in train])
    text_acc = LogisticRegression(max_iter=2000).fit(vec.transform([s.text for s in train]), y_tr).score(
        vec.transform([s.text for s in test]), y_te)
    pix = lambda ss: np.stack([np.asarray(s.image, dtype=np.float32).ravel() / 255 for s in ss])  # noqa: E731
    img_acc = LogisticRegression(max_iter=2000).fit(pix(train), y_tr).score(pix(test), y_te)
    assert text_acc < 0.45 and img_acc < 0.45, (text_acc, img_acc)
    # Sanity check that the information is there jointly: one-hot(hope, dread) x one-hot(shown) is separable.
    joint = lambda ss: np.stack([np.outer(  # noqa: E731
        np.eye(9)[KINDS.index(s.extra["hope"]) * 3 + KINDS.index(s.extra["dread"])], np.eye(3)[KINDS.index(s.extra["shown"])]
    ).ravel() for s in ss])
    assert LogisticRegression(max_iter=2000).fit(joint(train), y_tr).score(joint(test), y_te) == 1.0
    del sklearn
