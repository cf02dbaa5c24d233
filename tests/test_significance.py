"""Paired bootstrap over posts, pooled over seeds (mmsenti.experiment.significance)."""

from __future__ import annotations

import numpy as np
import pytest

from mmsenti.experiment.significance import paired_bootstrap
from mmsenti.metrics import Predictions, compute_metrics

NAMES = ["negative", "neutral", "positive"]


def _cls(labels: np.ndarray, pred: np.ndarray, ids=None) -> Predictions:
    logits = np.eye(3)[pred] * 2.0 + 0.1
    ids = np.array([f"p{i}" for i in range(len(labels))]) if ids is None else ids
    return Predictions(ids, labels, logits, "classification", NAMES)


def _noisy(labels: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    wrong = rng.random(len(labels)) > accuracy
    return np.where(wrong, (labels + rng.integers(1, 3, len(labels))) % 3, labels)


@pytest.fixture
def labels():
    return np.random.default_rng(0).integers(0, 3, 300)


def test_identical_predictions_give_an_interval_centred_on_zero(labels):
    rng = np.random.default_rng(1)
    seeds = [_cls(labels, _noisy(labels, 0.7, rng)) for _ in range(3)]
    r = paired_bootstrap(seeds, seeds, ["f1_weighted", "accuracy"], samples=500)
    for res in r.values():
        assert res.low <= 0 <= res.high
        assert res.difference == 0 and (res.low + res.high) / 2 == pytest.approx(0, abs=1e-12)
        assert res.a_better == 0 and not res.excludes_zero


def test_exchangeable_rows_give_mirrored_intervals(labels):
    rng = np.random.default_rng(2)
    a = [_cls(labels, _noisy(labels, 0.7, rng)) for _ in range(3)]
    b = [_cls(labels, _noisy(labels, 0.7, rng)) for _ in range(3)]
    ab = paired_bootstrap(a, b, ["accuracy"], samples=500, seed=3)["accuracy"]
    ba = paired_bootstrap(b, a, ["accuracy"], samples=500, seed=3)["accuracy"]
    assert ab.low <= 0 <= ab.high  # same skill: no difference claimed
    assert ab.difference == pytest.approx(-ba.difference)
    assert ab.low == pytest.approx(-ba.high) and ab.high == pytest.approx(-ba.low)


def test_a_model_right_wherever_the_other_is_wrong_excludes_zero(labels):
    rng = np.random.default_rng(3)
    a, b = [], []
    for _ in range(3):
        pb = _noisy(labels, 0.8, rng)
        b.append(_cls(labels, pb))
        a.append(_cls(labels, labels.copy()))  # right on every post, in particular where B is wrong
    r = paired_bootstrap(a, b, ["f1_weighted"], samples=1000)["f1_weighted"]
    assert r.low > 0 and r.excludes_zero and r.a_better == 3


def test_difference_is_the_difference_of_the_seed_means_and_ids_are_aligned(labels):
    rng = np.random.default_rng(4)
    a = [_cls(labels, _noisy(labels, 0.75, rng)) for _ in range(3)]
    b = [_cls(labels, _noisy(labels, 0.65, rng)) for _ in range(3)]
    direct = np.mean([compute_metrics("classification", p.labels, p.logits, NAMES)["f1_macro"] for p in a]) - \
        np.mean([compute_metrics("classification", p.labels, p.logits, NAMES)["f1_macro"] for p in b])
    r = paired_bootstrap(a, b, ["f1_macro"], samples=300)["f1_macro"]
    assert r.difference == pytest.approx(direct)
    perm = np.random.default_rng(5).permutation(len(labels))  # B's posts in another order: same result
    b_shuffled = [Predictions(p.ids[perm], p.labels[perm], p.logits[perm], p.task, p.label_names) for p in b]
    r2 = paired_bootstrap(a, b_shuffled, ["f1_macro"], samples=300)["f1_macro"]
    assert (r2.difference, r2.low, r2.high) == pytest.approx((r.difference, r.low, r.high))
    with pytest.raises(ValueError, match="different posts"):
        paired_bootstrap(a, [_cls(labels[:-1], labels[:-1])] * 3, ["accuracy"], samples=100)


def test_stable_across_bootstrap_seeds_within_the_stated_tolerance(labels):
    """The module promises: with 2,000 resamples the ends move by < 0.01 across bootstrap seeds."""
    rng = np.random.default_rng(6)
    a = [_cls(labels, _noisy(labels, 0.72, rng)) for _ in range(3)]
    b = [_cls(labels, _noisy(labels, 0.66, rng)) for _ in range(3)]
    runs = [paired_bootstrap(a, b, ["accuracy"], samples=2000, seed=s)["accuracy"] for s in range(4)]
    lows, highs = [r.low for r in runs], [r.high for r in runs]
    assert max(lows) - min(lows) < 0.01 and max(highs) - min(highs) < 0.01
    assert 0.07 < runs[0].high - runs[0].low < 0.2  # the tolerance is small against the interval's width


def test_regression_direction_and_strata():
    rng = np.random.default_rng(7)
    n = 400
    y = rng.uniform(-3, 3, n)
    ids = np.array([f"c{i}" for i in range(n)])
    good = [Predictions(ids, y, (y + rng.normal(0, 0.5, n))[:, None], "regression") for _ in range(2)]
    bad = [Predictions(ids, y, (y + rng.normal(0, 1.0, n))[:, None], "regression") for _ in range(2)]
    r = paired_bootstrap(good, bad, ["mae", "corr"], samples=500)
    assert r["mae"].high < 0 and r["mae"].a_better == 2  # lower MAE is better
    assert r["corr"].low > 0 and r["corr"].a_better == 2
    folds = np.arange(n) % 4
    s = paired_bootstrap(good, bad, ["mae"], samples=300, strata=folds)["mae"]
    per_fold = [np.mean([np.abs(p.logits[folds == f, 0] - y[folds == f]).mean() for p in good])
                - np.mean([np.abs(p.logits[folds == f, 0] - y[folds == f]).mean() for p in bad]) for f in range(4)]
    assert s.difference == pytest.approx(np.mean(per_fold))  # the mean over strata (CV folds) of the metric
