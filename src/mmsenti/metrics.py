"""Evaluation metrics in pure numpy, matching scikit-learn / scipy / MMSA so reported numbers are comparable.

Two families:

* :func:`classification_metrics` -- accuracy, weighted and macro F1, macro precision/recall, the confusion
  matrix and a per-class report. Zero divisions give 0, like scikit-learn's ``zero_division=0``.
* :func:`regression_metrics` -- the CMU-MOSI/MOSEI protocol used by MMSA and most papers: MAE, Pearson
  correlation, Acc-2 and its weighted F1 in the "has-zero" and "non-zero" variants, Acc-5 and Acc-7.

plus the calibration of class probabilities (:func:`expected_calibration_error`) and :class:`Predictions`, a
split's per-post outputs saved as ``.npz``, which metrics, paired significance tests and plots are computed from.

Every returned value is a plain python ``float``/``int`` (or list/dict of them), so the dicts go straight into
``json.dumps``. scikit-learn is only a test dependency; nothing here imports it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "ECE_BINS",
    "METRIC_DIRECTIONS",
    "TASKS",
    "Predictions",
    "calibration_bins",
    "classification_metrics",
    "compute_metrics",
    "expected_calibration_error",
    "format_table",
    "higher_is_better",
    "regression_metrics",
    "scores_to_predictions",
    "softmax",
]

TASKS = ("classification", "regression")

#: Whether a larger value of a metric is better ("max") or worse ("min"); used for model selection.
METRIC_DIRECTIONS: dict[str, Literal["max", "min"]] = {
    "accuracy": "max",
    "f1_weighted": "max",
    "f1_macro": "max",
    "precision_macro": "max",
    "recall_macro": "max",
    "mae": "min",
    "corr": "max",
    "acc2_has0": "max",
    "f1_has0": "max",
    "acc2_non0": "max",
    "f1_non0": "max",
    "acc5": "max",
    "acc7": "max",
    "loss": "min",
}


def higher_is_better(name: str) -> bool:
    """Whether a larger ``name`` is better. MAE and losses (``loss``, ``loss_*``, ``*_loss``) are minimised;
    every other metric, known or not, is maximised."""
    if name in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[name] == "max"
    # Named loss terms (e.g. "loss_g" from a loss module) are minimised too.
    return not (name.startswith("loss") or name.endswith("loss"))


# ----------------------------------------------------------------------------------------------- helpers
def _as_1d(x: Any, what: str) -> np.ndarray:
    # np.asarray also takes CPU torch tensors and lists; (N, 1) regression heads are flattened.
    a = np.asarray(x)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    return a


def _check_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_1d(y_true, "y_true"), _as_1d(y_pred, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length: {len(t)} vs {len(p)}")
    if len(t) == 0:
        raise ValueError("cannot compute metrics on zero samples")
    return t, p


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise with 0 where ``den == 0`` (scikit-learn's ``zero_division=0``)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _confusion(t_idx: np.ndarray, p_idx: np.ndarray, n: int) -> np.ndarray:
    """``n x n`` counts, rows = true class index, columns = predicted class index."""
    return np.bincount(t_idx * n + p_idx, minlength=n * n).reshape(n, n)


def _to_class_ids(y: np.ndarray, n: int, what: str) -> np.ndarray:
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{what} must hold integer class ids, got non-integer values")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"{what} must hold integer class ids when label_names are given, got dtype {y.dtype}")
    ids = y.astype(np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"{what} holds class ids outside [0, {n}) (label_names has {n} names)")
    return ids


def _prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    pred_count = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = _safe_div(tp, pred_count)
    recall = _safe_div(tp, support)
    # 2tp / (2tp + fp + fn) equals the harmonic mean where defined and is 0 (not NaN) where P = R = 0.
    f1 = _safe_div(2 * tp, pred_count + support)
    return precision, recall, f1, support


def _weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """scikit-learn's ``f1_score(average="weighted", zero_division=0)`` over the labels seen in either array."""
    labels, inv = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    n, k = len(labels), len(y_true)
    _, _, f1, support = _prf(_confusion(inv[:k], inv[k:], n))
    return float(_safe_div((f1 * support).sum(), support.sum()))


# ----------------------------------------------------------------------------------------------- classification
def classification_metrics(y_true: Any, y_pred: Any, label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, F1 (weighted and macro), macro precision/recall, confusion matrix and a per-class report.

    Args:
        y_true: Gold labels, shape ``(N,)``.
        y_pred: Predicted labels, shape ``(N,)``.
        label_names: Names of the classes ``0 .. C-1``. When given, every class is reported -- also one that
            occurs in neither array -- and the labels must be integer ids in ``[0, C)``. Note that such an
            absent class then counts in the macro averages with 0, as in scikit-learn with ``labels=range(C)``.
            Without names, the classes are the sorted union of the values in ``y_true`` and ``y_pred``, named
            by ``str(value)``.

    Returns:
        ``accuracy``, ``f1_weighted``, ``f1_macro``, ``precision_macro``, ``recall_macro`` (floats),
        ``confusion_matrix`` (list of lists, rows = true class, columns = predicted class, in label order) and
        ``per_class`` (``{name: {"precision", "recall", "f1", "support"}}``). Divisions by zero give 0.

    Raises:
        ValueError: On empty or mismatched inputs, or ids outside ``[0, C)`` when names are given.
    """
    t, p = _check_pair(y_true, y_pred)
    if label_names is not None:
        names = [str(n) for n in label_names]
        if not names:
            raise ValueError("label_names is empty")
        t_idx, p_idx = _to_class_ids(t, len(names), "y_true"), _to_class_ids(p, len(names), "y_pred")
    else:
        labels, inv = np.unique(np.concatenate([t, p]), return_inverse=True)
        names = [str(v) for v in labels.tolist()]
        t_idx, p_idx = inv[: len(t)], inv[len(t):]
    cm = _confusion(t_idx, p_idx, len(names))
    precision, recall, f1, support = _prf(cm)
    return {
        "accuracy": float(np.mean(t_idx == p_idx)),
        "f1_weighted": float(_safe_div((f1 * support).sum(), support.sum())),
        "f1_macro": float(f1.mean()),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(names)
        },
    }


# ----------------------------------------------------------------------------------------------- regression
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r; 0.0 when either side is constant (where r is undefined) so the value stays JSON-safe."""
    # Test constancy exactly: after centring, float round-off can leave a constant side with tiny non-zero spread.
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum()) * np.sqrt((b * b).sum())
    return float(np.clip((a * b).sum() / den, -1.0, 1.0))


def _multiclass_acc(pred: np.ndarray, true: np.ndarray, bound: float) -> float:
    # MMSA: clip both to [-bound, bound], then np.round (half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2) and compare.
    return float(np.mean(np.round(np.clip(pred, -bound, bound)) == np.round(np.clip(true, -bound, bound))))


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """The CMU-MOSI/MOSEI sentiment-score metrics, defined as in MMSA (``MetricsTop``), for scores in [-3, 3].

    * ``mae``: mean absolute error; ``corr``: Pearson correlation (0.0 when either side is constant).
    * ``acc2_has0`` / ``f1_has0``: negative (< 0) vs non-negative (>= 0), accuracy and weighted F1.
    * ``acc2_non0`` / ``f1_non0``: samples whose *true* score is exactly 0 are dropped; the rest are compared
      as positive (> 0) vs not (so a predicted 0 counts as negative). 0.0 when every true score is 0.
    * ``acc5`` / ``acc7``: both sides clipped to [-2, 2] / [-3, 3] and rounded to the nearest integer with
      numpy's half-to-even rounding, then compared (5 / 7 sentiment classes).

    Args:
        y_true: Gold scores, shape ``(N,)`` or ``(N, 1)``.
        y_pred: Predicted scores, same shape.

    Returns:
        The metrics above as python floats.
    """
    t, p = _check_pair(y_true, y_pred)
    t, p = t.astype(np.float64), p.astype(np.float64)
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(p))):
        raise ValueError("regression metrics need finite scores (got NaN or inf)")

    t_has0, p_has0 = t >= 0, p >= 0
    nz = t != 0
    t_non0, p_non0 = t[nz] > 0, p[nz] > 0
    has_non0 = bool(nz.any())
    return {
        "mae": float(np.mean(np.abs(p - t))),
        "corr": _pearson(p, t),
        "acc2_has0": float(np.mean(t_has0 == p_has0)),
        "f1_has0": _weighted_f1(t_has0, p_has0),
        "acc2_non0": float(np.mean(t_non0 == p_non0)) if has_non0 else 0.0,
        "f1_non0": _weighted_f1(t_non0, p_non0) if has_non0 else 0.0,
        "acc5": _multiclass_acc(p, t, 2.0),
        "acc7": _multiclass_acc(p, t, 3.0),
    }


# ----------------------------------------------------------------------------------------------- dispatch
def compute_metrics(task: str, y_true: Any, y_pred_or_scores: Any,
                    label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics for ``task``.

    Args:
        task: ``"classification"`` or ``"regression"``.
        y_true: Gold class ids or scores, shape ``(N,)``.
        y_pred_or_scores: Classification: predicted class ids ``(N,)``, or class scores ``(N, C)`` (arg-maxed).
            Regression: predicted scores ``(N,)`` or ``(N, 1)``.
        label_names: Class names (classification only; ignored for regression).

    Returns:
        :func:`classification_metrics` or :func:`regression_metrics`'s dict.
    """
    if task == "classification":
        pred = np.asarray(y_pred_or_scores)
        if pred.ndim == 2 and pred.shape[1] > 1:
            pred = pred.argmax(-1)
        return classification_metrics(y_true, pred, label_names or None)
    if task == "regression":
        return regression_metrics(y_true, y_pred_or_scores)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


# --------------------------------------------------------------------------------------------- calibration
ECE_BINS = 15  # Guo et al. 2017


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Per equal-width confidence bin ``(i/bins, (i+1)/bins]``: count, mean confidence, accuracy (NaN if empty)."""
    conf = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # conf in (i/b, (i+1)/b] → bin i
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / count
        acc = np.bincount(idx, weights=correct, minlength=bins) / count
    return count, mean_conf, acc


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the bin-size-weighted mean of |accuracy − mean confidence| over equal-width confidence bins."""
    count, conf, acc = calibration_bins(probs, labels, bins)
    full = count > 0
    return float(np.sum(count[full] / count.sum() * np.abs(acc[full] - conf[full])))


# ------------------------------------------------------------------------------------------ saved outputs
def scores_to_predictions(task: str, logits: np.ndarray) -> np.ndarray:
    return logits.argmax(-1) if task == "classification" else logits[:, 0]


@dataclass
class Predictions:
    """Per-post outputs of a model on one split: what paired significance tests and plots are computed from.

    Saved as one ``.npz`` (no pickles): ``ids`` (str), ``labels``, ``logits`` (N, C) class scores or (N, 1)
    regression scores, ``task`` and ``label_names`` (JSON).
    """

    ids: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    task: str
    label_names: list[str] | None = None

    def metrics(self, index: np.ndarray | None = None) -> dict:
        """:func:`compute_metrics` of these predictions (of the posts ``index`` selects)."""
        labels, logits = (self.labels, self.logits) if index is None else (self.labels[index], self.logits[index])
        return compute_metrics(self.task, labels, scores_to_predictions(self.task, logits), self.label_names)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(tmp, ids=np.asarray(self.ids, dtype=str), labels=self.labels, logits=self.logits,
                            task=np.asarray(self.task), label_names=np.asarray(json.dumps(self.label_names)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Predictions:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["ids"], z["labels"], z["logits"], str(z["task"]), json.loads(str(z["label_names"])))


# ----------------------------------------------------------------------------------------------- reporting
def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def format_table(metrics_by_split: Mapping[str, Mapping[str, Any]], keys: Sequence[str] | None = None) -> str:
    """An aligned plain-text table: one row per split, one column per scalar metric, 4 decimals.

    Args:
        metrics_by_split: e.g. ``{"dev": {...}, "test": {...}}`` as returned by :func:`compute_metrics`.
        keys: Columns to show, in order. Default: every scalar metric, in order of first appearance
            (non-scalar entries such as ``confusion_matrix`` are skipped). A split lacking a key shows ``-``.

    Returns:
        The table, without a trailing newline.
    """
    if keys is None:
        keys = []
        for m in metrics_by_split.values():
            keys += [k for k, v in m.items() if _is_scalar(v) and k not in keys]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(int(v))
        if _is_scalar(v):
            return f"{float(v):.4f}"
        return str(v)

    header = ["split", *keys]
    rows = [[str(split), *(cell(m.get(k)) for k in keys)] for split, m in metrics_by_split.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        # Split names left-aligned, numbers right-aligned so decimals line up.
        return "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
