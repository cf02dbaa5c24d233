"""Paired bootstrap over test posts, pooled over seeds: is a difference between two rows more than noise?

For rows A and B trained with the same seeds and scored on the same posts, the statistic is the difference of
the seed-means of a metric, ``mean_s m(A_s) - mean_s m(B_s)`` (the difference of the table's two means). Each
bootstrap replicate draws the posts with replacement *once* and scores every seed of both rows on that same
draw, so the interval reflects which posts happen to be in the test set, with A and B kept paired post by post
(Koehn 2004; Berg-Kirkpatrick et al. 2012). The interval is the percentile interval of the replicates. With
``strata`` (cross-validation folds) posts are drawn within each stratum and the metric is the mean over strata,
matching "the mean dev metric over folds".

What it does not cover: the variation from training seeds beyond the ones run. That is what the count of seeds
in which A beats B (each seed scored on all posts) is for; both are reported.

Stability: with the default 2,000 resamples, the interval's ends move by less than 0.01 across bootstrap seeds
(about a ninth of the interval's width for 300 posts; tests/test_significance.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmsenti.metrics import Predictions, higher_is_better


@dataclass
class PairedResult:
    metric: str
    difference: float  # mean over seeds of A's metric minus B's, on all posts
    low: float  # percentile interval of the difference
    high: float
    level: float
    a_better: int  # seeds in which A's metric is better than B's (direction-aware: lower MAE is better)
    seeds: int
    posts: int
    samples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def align(runs: Sequence[Predictions], ids: np.ndarray) -> list[Predictions]:
    """``runs`` reordered to the sorted ``ids``; every run must hold exactly those posts."""
    out = []
    for p in runs:
        where = np.argsort(p.ids, kind="stable")
        if len(p.ids) != len(ids) or not np.array_equal(p.ids[where], ids):
            raise ValueError("paired bootstrap: the runs were scored on different posts")
        out.append(Predictions(p.ids[where], p.labels[where], p.logits[where], p.task, p.label_names))
    return out


def _score(runs: Sequence[Predictions], metrics: Sequence[str], index: np.ndarray | None,
           strata: list[np.ndarray] | None) -> np.ndarray:
    """(seeds, metrics): each run's metrics on the posts ``index`` picks (mean over strata when given)."""
    out = np.empty((len(runs), len(metrics)))
    for i, p in enumerate(runs):
        parts = [index] if strata is None else strata
        values = []
        for part in parts:
            m = p.metrics(part)
            values.append([m[k] for k in metrics])
        out[i] = np.mean(values, axis=0)
    return out


def paired_bootstrap(a: Sequence[Predictions], b: Sequence[Predictions], metrics: Sequence[str], *,
                     samples: int = 2000, seed: int = 0, level: float = 0.95,
                     strata: np.ndarray | None = None) -> dict[str, PairedResult]:
    """Paired bootstrap of ``mean_s metric(A_s) - mean_s metric(B_s)`` over posts.

    Args:
        a, b: predictions of rows A and B, one per seed, paired by position (same seed at the same index); all
            on the same posts (in any order: they are aligned by id).
        metrics: metric names of :func:`~mmsenti.metrics.compute_metrics` (e.g. ``f1_weighted``, ``mae``).
        samples: bootstrap replicates.
        seed: seed of the resampling (the result moves little with it: see the module docstring).
        level: coverage of the percentile interval.
        strata: optional stratum per post of ``a[0]`` (e.g. its CV fold): posts are resampled within strata and
            the metric is the mean over strata.

    Returns:
        ``{metric: PairedResult}``.
    """
    if not a or len(a) != len(b):
        raise ValueError(f"paired bootstrap needs the same number of seeds on both sides, got {len(a)} and {len(b)}")
    ids = np.sort(a[0].ids)
    if strata is not None:
        strata = np.asarray(strata)[np.argsort(a[0].ids)]
    a, b = align(a, ids), align(b, ids)
    n = len(ids)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    base_a, base_b = _score(a, metrics, None, None if strata is None else groups), \
        _score(b, metrics, None, None if strata is None else groups)
    rng = np.random.default_rng(seed)
    diffs = np.empty((samples, len(metrics)))
    for r in range(samples):
        draws = [g[rng.integers(0, len(g), len(g))] for g in groups]
        if strata is None:
            sa, sb = _score(a, metrics, draws[0], None), _score(b, metrics, draws[0], None)
        else:
            sa, sb = _score(a, metrics, None, draws), _score(b, metrics, None, draws)
        diffs[r] = sa.mean(0) - sb.mean(0)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail], axis=0)
    out = {}
    for j, m in enumerate(metrics):
        better = base_a[:, j] > base_b[:, j] if higher_is_better(m) else base_a[:, j] < base_b[:, j]
        out[m] = PairedResult(m, float(base_a[:, j].mean() - base_b[:, j].mean()), float(low[j]), float(high[j]),
                              level, int(better.sum()), len(a), n, samples)
    return out
