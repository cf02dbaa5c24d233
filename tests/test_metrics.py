"""mmsenti.metrics against scikit-learn / scipy on random inputs, plus hand-checked MOSI-protocol edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from mmsenti.metrics import (
    METRIC_DIRECTIONS,
    classification_metrics,
    compute_metrics,
    format_table,
    higher_is_better,
    regression_metrics,
)

SEEDS = range(40)


def _random_classification(rng: np.random.Generator, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Small random label arrays that often miss a class in y_true and/or never predict one."""
    n = int(rng.integers(1, 40))
    true_classes = np.arange(n_classes)
    pred_classes = np.arange(n_classes)
    if rng.random() < 0.5 and n_classes > 2:
        true_classes = np.delete(true_classes, rng.integers(n_classes))  # a class absent from y_true
    if rng.random() < 0.5:
        pred_classes = np.delete(pred_classes, rng.integers(n_classes))  # a class never predicted
    y_true = rng.choice(true_classes, n)
    # Mostly-correct predictions so every metric is away from 0 and errors show.
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.choice(pred_classes, n))
    y_pred = np.where(np.isin(y_pred, pred_classes), y_pred, rng.choice(pred_classes, n))
    return y_true, y_pred


def _assert_json_plain(obj) -> None:
    """Only python dict/list/str/int/float inside, all finite: ``json.dumps(allow_nan=False)`` must accept it."""
    json.dumps(obj, allow_nan=False)

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                assert type(k) is str
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        else:
            assert type(o) in (int, float), f"{o!r} is a {type(o)}"

    walk(obj)


# ----------------------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("n_classes", [2, 3, 5, 7])
def test_classification_matches_sklearn_with_label_names(n_classes):
    labels = list(range(n_classes))
    names = [f"c{i}" for i in labels]
    for seed in SEEDS:
        rng = np.random.default_rng(1000 * n_classes + seed)
        y_true, y_pred = _random_classification(rng, n_classes)
        m = classification_metrics(y_true, y_pred, names)
        kw = {"labels": labels, "zero_division": 0}
        assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
        assert m["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", **kw), abs=1e-12)
        assert m["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro", **kw), abs=1e-12)
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, **kw)
        pm, rm, _, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", **kw)
        assert m["precision_macro"] == pytest.approx(pm, abs=1e-12)
        assert m["recall_macro"] == pytest.approx(rm, abs=1e-12)
        assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
        assert list(m["per_class"]) == names  # every class, in label order, even when absent
        for i, name in enumerate(names):
            pc = m["per_class"][name]
            assert (pc["precision"], pc["recall"], pc["f1"]) == pytest.approx((p[i], r[i], f[i]), abs=1e-12)
            assert pc["support"] == s[i]
        _assert_json_plain(m)


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn's note when one class is seen
@pytest.mark.parametrize("n_classes", [2, 4, 6])
def test_classification_matches_sklearn_without_names(n_classes):
    for seed in SEEDS:
        rng = np.random.default_rng(7 + 100 * n_classes + seed)
        y_true, y_pred = _random_classification(rng, n_classes)
        y_true, y_pred = y_true + 3, y_pred + 3  # ids need not start at 0 without names
        m = classification_metrics(y_true, y_pred)
        seen = np.union1d(y_true, y_pred)
        assert list(m["per_class"]) == [str(c) for c in seen]
        assert m["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", zero_division=0))
        assert m["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
        assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred).tolist()


def test_absent_and_never_predicted_classes_by_hand():
    # Class 2 ("pos") is never predicted, class 3 ("other") occurs nowhere, class 1 only in predictions.
    y_true = [0, 0, 2, 2]
    y_pred = [0, 1, 0, 0]
    m = classification_metrics(y_true, y_pred, ["neg", "neu", "pos", "other"])
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == 0.25
    neg = m["per_class"]["neg"]
    assert neg == {"precision": pytest.approx(1 / 3), "recall": 0.5, "f1": pytest.approx(0.4), "support": 2}
    for name in ("neu", "pos", "other"):
        assert m["per_class"][name]["f1"] == 0.0
    assert m["per_class"]["other"]["support"] == 0
    assert m["f1_macro"] == pytest.approx(0.4 / 4)  # absent classes count with 0, as sklearn with labels=...
    assert m["f1_weighted"] == pytest.approx(0.4 * 2 / 4)
    assert m["precision_macro"] == pytest.approx((1 / 3) / 4)


def test_classification_input_forms_and_errors():
    ref = classification_metrics([0, 1, 2, 1], [0, 2, 2, 1], ["a", "b", "c"])
    # float ids (e.g. labels that went through a float tensor) and (N, 1) columns give the same result
    assert classification_metrics(np.array([0.0, 1, 2, 1]), np.array([[0], [2], [2], [1]]), ["a", "b", "c"]) == ref
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 3], [0, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 1], [0, -1], ["a", "b"])
    with pytest.raises(ValueError, match="integer"):
        classification_metrics([0.5, 1], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="length"):
        classification_metrics([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError, match="zero samples"):
        classification_metrics([], [], ["a", "b"])
    with pytest.raises(ValueError, match="1-D"):
        classification_metrics(np.zeros((2, 3)), np.zeros((2, 3)))


def test_string_labels_without_names():
    m = classification_metrics(["pos", "neg", "pos"], ["pos", "pos", "pos"])
    assert list(m["per_class"]) == ["neg", "pos"]
    assert m["confusion_matrix"] == [[0, 1], [0, 2]]


# ----------------------------------------------------------------------------------------------- regression
def _mmsa_reference(t: np.ndarray, p: np.ndarray) -> dict:
    """The MOSI protocol written independently with sklearn/scipy, per ../shared/data/README.md and MMSA."""
    nz = t != 0

    def acc_k(bound):
        return accuracy_score(np.round(np.clip(t, -bound, bound)), np.round(np.clip(p, -bound, bound)))

    return {
        "mae": float(np.abs(t - p).mean()),
        "corr": pearsonr(p, t)[0],
        "acc2_has0": accuracy_score(t >= 0, p >= 0),
        "f1_has0": f1_score(t >= 0, p >= 0, average="weighted", zero_division=0),
        "acc2_non0": accuracy_score(t[nz] > 0, p[nz] > 0),
        "f1_non0": f1_score(t[nz] > 0, p[nz] > 0, average="weighted", zero_division=0),
        "acc5": acc_k(2.0),
        "acc7": acc_k(3.0),
    }


def test_regression_matches_reference_on_random_scores():
    for seed in range(60):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(5, 80))
        # MOSI-like scores: multiples of 1/3 (so exact zeros and .5-free values occur) plus some half-integers.
        t = np.round(rng.uniform(-3, 3, n) * 3) / 3
        t[rng.random(n) < 0.15] = 0.0
        t[rng.random(n) < 0.1] = rng.choice([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
        p = t + rng.normal(0, 1.0, n)
        p[rng.random(n) < 0.1] = rng.choice([-4.0, 0.0, 3.5])  # beyond the scale, and exact zeros
        m = regression_metrics(t, p)
        ref = _mmsa_reference(t, p)
        assert set(m) == set(ref)
        for k, v in ref.items():
            assert m[k] == pytest.approx(v, abs=1e-10), (seed, k)
        _assert_json_plain(m)


def test_regression_hand_checked():
    m = regression_metrics([-1.0, 0.0, 0.0, 2.0], [-0.5, 0.3, -0.2, 0.0])
    assert m["mae"] == pytest.approx(0.75)
    assert m["acc2_has0"] == 0.75  # true >=0: F T T T, pred >=0: F T F T
    assert m["f1_has0"] == pytest.approx((1 * 2 / 3 + 3 * 0.8) / 4)
    assert m["acc2_non0"] == 0.5  # true zeros dropped; pred 0.0 is not > 0, so counts as negative
    assert m["f1_non0"] == pytest.approx((2 / 3) / 2)
    assert m["acc7"] == 0.5 and m["acc5"] == 0.5  # round(-0.5) == 0 == round(-0.2)


def test_regression_clipping():
    t, p = [3.0, -3.0, 2.6, 2.4], [5.0, -4.2, 2.5, 2.5]
    m = regression_metrics(t, p)
    assert m["acc7"] == 0.75  # 5 -> 3 and -4.2 -> -3 after clipping; 2.5 rounds to 2 but 2.6 to 3
    assert m["acc5"] == 1.0  # everything clips to +-2


def test_regression_rounding_is_half_to_even_like_mmsa():
    t = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
    p = [0.0, 2.0, 2.0, 0.0, -2.0, -2.0]
    m = regression_metrics(t, p)
    assert m["acc7"] == 1.0 and m["acc5"] == 1.0
    # predictions rounded half away from zero match only at +-1.5
    assert regression_metrics(t, [1.0, 2.0, 3.0, -1.0, -2.0, -3.0])["acc7"] == pytest.approx(1 / 3)


def test_regression_exact_zero_truths():
    m = regression_metrics([0.0, 0.0, 1.0], [0.0, -0.1, 0.5])
    assert m["acc2_has0"] == pytest.approx(2 / 3)  # true 0 is non-negative; -0.1 is not
    assert m["acc2_non0"] == 1.0 and m["f1_non0"] == 1.0  # only the 1.0 sample remains
    all_zero = regression_metrics([0.0, 0.0], [0.3, -0.3])
    assert all_zero["acc2_non0"] == 0.0 and all_zero["f1_non0"] == 0.0
    assert all_zero["acc2_has0"] == 0.5


def test_corr_constant_sides_are_zero():
    t = np.array([0.1, 0.1, 0.1])  # mean() of 0.1s is not exactly 0.1: constancy must be tested exactly
    assert regression_metrics(t, [1.0, 2.0, 3.0])["corr"] == 0.0
    assert regression_metrics([1.0, -2.0, 3.0], [0.7, 0.7, 0.7])["corr"] == 0.0
    assert regression_metrics([2.0], [1.0])["corr"] == 0.0
    assert regression_metrics([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])["corr"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert regression_metrics(a, b)["corr"] == pytest.approx(pearsonr(b, a)[0], abs=1e-12)


def test_regression_accepts_column_and_rejects_nan():
    t = np.array([0.5, -1.0, 2.0])
    assert regression_metrics(t[:, None], t[:, None] + 0.1) == regression_metrics(t, t + 0.1)
    with pytest.raises(ValueError, match="finite"):
        regression_metrics([0.0, float("nan")], [0.0, 1.0])


# ----------------------------------------------------------------------------------------------- dispatch etc.
def test_compute_metrics_dispatch():
    scores = np.array([[0.1, 0.9, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    m = compute_metrics("classification", [1, 0, 1], scores, ["a", "b", "c"])
    assert m == classification_metrics([1, 0, 1], [1, 0, 2], ["a", "b", "c"])
    assert compute_metrics("classification", [1, 0], [1, 1]) == classification_metrics([1, 0], [1, 1])
    r = compute_metrics("regression", [0.5, -1.0], np.array([[0.4], [-0.2]]), label_names=None)
    assert r == regression_metrics([0.5, -1.0], [0.4, -0.2])
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("ranking", [0], [0])


def test_higher_is_better():
    assert not higher_is_better("mae") and not higher_is_better("loss") and not higher_is_better("loss_g")
    for name in ("accuracy", "f1_weighted", "f1_macro", "corr", "acc2_has0", "f1_non0", "acc5", "acc7"):
        assert higher_is_better(name)
    assert higher_is_better("some_new_score")
    # every scalar a metric function returns has an explicit direction
    scalars = {k for k, v in classification_metrics([0, 1], [0, 1]).items() if isinstance(v, float)}
    scalars |= set(regression_metrics([0.5, -1.0], [0.4, -0.2]))
    assert scalars <= set(METRIC_DIRECTIONS)


def test_format_table():
    dev = classification_metrics([0, 1, 2, 1], [0, 2, 2, 1], ["a", "b", "c"])
    test = classification_metrics([0, 1, 1], [0, 1, 0], ["a", "b", "c"])
    dev["loss"] = 0.123456
    table = format_table({"dev": dev, "test": test})
    lines = table.splitlines()
    assert lines[0].split() == ["split", "accuracy", "f1_weighted", "f1_macro", "precision_macro", "recall_macro",
                                "loss"]
    assert "confusion_matrix" not in table and "per_class" not in table
    assert lines[2].split()[0] == "dev" and lines[3].split()[0] == "test"
    assert lines[2].split()[1] == f"{dev['accuracy']:.4f}" == "0.7500"
    assert lines[3].split()[2] == f"{test['f1_weighted']:.4f}"
    assert lines[2].split()[-1] == "0.1235" and lines[3].split()[-1] == "-"  # missing key
    assert len({len(line) for line in lines}) == 1  # aligned: numbers are right-aligned to the header's width
    only = format_table({"test": regression_metrics([0.5, -1.0], [0.4, -0.2])}, keys=["mae", "acc7"])
    assert only.splitlines()[0].split() == ["split", "mae", "acc7"]
    assert only.splitlines()[2].split() == ["test", "0.4500", "0.5000"]


def test_nan_free_on_degenerate_inputs():
    for m in (classification_metrics([0, 0], [1, 1], ["a", "b"]), regression_metrics([0.0, 0.0], [0.0, 0.0])):
        _assert_json_plain(m)
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in m.values())
