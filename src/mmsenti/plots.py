"""Figures of a model's evaluation: confusion matrix, reliability diagram (with the ECE) and, for regression, predicted
against true scores (`mmsenti evaluate RUN --plots DIR`); :func:`figure` is the one way mmsenti makes a figure.

matplotlib's object API on the Agg canvas (no pyplot, no display, no global state), so it is safe in servers and
threads. matplotlib is an optional dependency: ``pip install 'mmsenti[plots]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmsenti.errors import DataError
from mmsenti.metrics import (
    ECE_BINS,
    Predictions,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    scores_to_predictions,
    softmax,
)


def figure(width: float, height: float):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches on its own Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DataError("plots need matplotlib: pip install 'mmsenti[plots]'") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (its folder made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def confusion_png(cm: np.ndarray, names: Sequence[str], path: str | Path, title: str) -> Path:
    """Counts, coloured by the share of each true class (row-normalised)."""
    cm = np.asarray(cm)
    n = len(names)
    fig = figure(2.4 + 0.75 * n, 1.6 + 0.65 * n)
    ax = fig.add_subplot()
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(n), names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return save(fig, path)


def reliability_png(probs: np.ndarray, labels: np.ndarray, path: str | Path, title: str,
                    bins: int = ECE_BINS) -> tuple[Path, float]:
    """Accuracy per confidence bin against the diagonal, with the ECE; a histogram of confidences below."""
    count, conf, acc = calibration_bins(probs, labels, bins)
    ece = expected_calibration_error(probs, labels, bins)
    fig = figure(4.6, 5.2)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = np.linspace(0, 1, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    full = count > 0
    ax.bar(centres[full], acc[full], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centres[full], conf[full] - acc[full], bottom=acc[full], width=width, color="tab:red", alpha=0.3,
           edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {ece:.4f} ({bins} bins, {int(count.sum())} posts)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centres, count, width=width, color="gray", edgecolor="black")
    hist.set_xlabel("confidence (max softmax probability)")
    hist.set_ylabel("posts")
    return save(fig, path), ece


def regression_png(scores: np.ndarray, labels: np.ndarray, path: str | Path, title: str) -> Path:
    """Predicted against true sentiment scores."""
    fig = figure(4.6, 4.4)
    ax = fig.add_subplot()
    ax.scatter(labels, scores, s=6, alpha=0.4)
    lo, hi = float(min(labels.min(), scores.min())), float(max(labels.max(), scores.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("true score")
    ax.set_ylabel("predicted score")
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def evaluation_plots(preds: Predictions, directory: str | Path, split: str) -> dict[str, object]:
    """The plots of one split: {name: path} plus ``ece`` (classification). Regression: a scatter plot and the
    confusion matrix of the 7 rounded sentiment classes (Acc-7's); reliability needs class probabilities."""
    directory = Path(directory)
    out: dict[str, object] = {}
    if preds.task == "classification":
        names = preds.label_names or [str(i) for i in range(preds.logits.shape[1])]
        pred = scores_to_predictions(preds.task, preds.logits)
        cm = np.asarray(classification_metrics(preds.labels, pred, names)["confusion_matrix"])
        out["confusion"] = confusion_png(cm, names, directory / f"{split}-confusion.png", f"{split}: confusion matrix")
        out["reliability"], out["ece"] = reliability_png(
            softmax(preds.logits), preds.labels.astype(int), directory / f"{split}-reliability.png",
            f"{split}: reliability")
        return out
    scores = preds.logits[:, 0]
    out["scatter"] = regression_png(scores, preds.labels, directory / f"{split}-scatter.png", f"{split}: scores")
    classes = list(range(-3, 4))
    t = np.round(np.clip(preds.labels, -3, 3)).astype(int) + 3
    p = np.round(np.clip(scores, -3, 3)).astype(int) + 3
    cm = np.bincount(t * 7 + p, minlength=49).reshape(7, 7)
    out["confusion"] = confusion_png(cm, [str(c) for c in classes], directory / f"{split}-confusion.png",
                                     f"{split}: rounded scores (Acc-7 classes)")
    return out


def write_evaluation_plots(predictions_dir: str | Path, splits: Sequence[str], directory: str | Path) -> None:
    """`mmsenti evaluate --plots`: the plots of each split's saved predictions; prints what it wrote."""
    for split in splits:
        made = evaluation_plots(Predictions.load(Path(predictions_dir) / f"{split}.npz"), directory, split)
        ece = f" (ECE {made.pop('ece'):.4f}, {ECE_BINS} bins)" if "ece" in made else ""
        print(f"{split}: " + ", ".join(str(p) for p in made.values()) + ece)
