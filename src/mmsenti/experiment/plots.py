"""Bar charts of an experiment's table, one per group (`mmsenti experiment table FILE --plot DIR`).

Drawn like every mmsenti figure (:func:`mmsenti.plots.figure`: matplotlib's Agg canvas, ``pip install
'mmsenti[plots]'``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmsenti.plots import figure, save


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "group"


def bar_chart(title: str, names: Sequence[str], means: Sequence[float], stds: Sequence[float], metric: str,
              path: str | Path, references: Sequence[tuple[str, float]] = ()) -> Path:
    """Horizontal bars of the mean with ± std error bars; reference figures as dashed lines."""
    fig = figure(7.5, 1.2 + 0.45 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]
    ax.barh(y, means, xerr=stds, capsize=4, color="tab:blue", alpha=0.8, ecolor="black")
    ax.set_yticks(y, names, fontsize=8)
    for i, (name, value) in enumerate(references):
        ax.axvline(value, ls="--", lw=1, color=f"C{i + 1}", label=f"reference: {name}")
    lo = min([m - s for m, s in zip(means, stds, strict=True)] + [v for _, v in references])
    hi = max([m + s for m, s in zip(means, stds, strict=True)] + [v for _, v in references])
    pad = (hi - lo) * 0.15 + 1e-3
    ax.set_xlim(min(0.0, lo - pad) if metric == "corr" else 0.0, hi + pad)  # bars start at 0: no zoomed gaps
    ax.set_xlabel(f"test {metric} (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    if references:
        ax.legend(fontsize=7, loc="lower right")
    return save(fig, path)


def experiment_bar_charts(exp, results, directory: str | Path) -> list[Path]:
    """One PNG per group of an experiment table: each row's main metric (weighted F1 or MAE)."""
    from mmsenti.experiment.table import mean_std

    out = []
    for group in exp.groups():
        rows = [r for r in exp.rows if r.group == group and results[r.id]]
        if not rows:
            continue
        metric = "mae" if "mae" in results[rows[0].id][0].test else "f1_weighted"
        stats = [mean_std([x.test[metric] for x in results[r.id]]) for r in rows]
        refs = [(ref.short or ref.name, ref.metrics[metric]) for ref in exp.references.get(group, [])
                if metric in ref.metrics]
        out.append(bar_chart(group, [r.name for r in rows], [m for m, _ in stats], [s for _, s in stats], metric,
                             Path(directory) / f"{slug(exp.name)}-{slug(group)}.png", refs))
    return out
