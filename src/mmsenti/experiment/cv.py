"""K-fold cross-validation on train+dev: for small datasets whose dev split is too small to rank configurations.

The dataset's train and dev splits are pooled and cut into K stratified folds; a fold run trains on K-1 folds,
selects its epoch on the remaining one (its dev split) and never loads the test split. Configurations are then
compared on the mean dev metric over the folds, and only the selected configuration is scored on test (by the
experiment runner, with a normal train/dev run: see docs/experiments.md).

The folds (:func:`mmsenti.data.splits.make_folds`) depend only on the pooled posts and ``run.cv_seed``, never on
the training seed or the configuration, so every seed and every configuration of an experiment sees the same
folds: comparisons between them are paired. This module trains them.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

from mmsenti.config import Config, build_config

log = logging.getLogger(__name__)

CV_SUMMARY = "cv.json"  # written by train_folds into the parent run directory


def fold_config(cfg: Config, fold: int, out: Path) -> Config:
    """A copy of ``cfg`` that trains fold ``fold`` into ``out``."""
    data = cfg.to_dict()
    data["run"].update(cv_fold=fold, out=str(out))
    return build_config(data)


def summarize(metrics: Sequence[dict]) -> dict:
    """Mean and sample std (n-1) over folds of every scalar dev metric the fold runs share."""
    keys = [k for k, v in metrics[0].items() if isinstance(v, (int, float)) and all(k in m for m in metrics)]
    return {"mean": {k: statistics.fmean(m[k] for m in metrics) for k in keys},
            "std": {k: statistics.stdev(m[k] for m in metrics) if len(metrics) > 1 else 0.0 for k in keys}}


def train_folds(cfg: Config, out: str | Path, dist=None) -> dict:
    """Train every fold of ``cfg`` into ``out/fold<i>`` and write ``out/cv.json``; re-running continues.

    Finished folds (``metrics.json`` present) are kept, a killed fold resumes from its last checkpoint.
    ``dist``: this process's :class:`~mmsenti.distributed.Distributed` when several train each fold (rank 0 writes).
    """
    from mmsenti.train.trainer import Trainer, select_metric

    out = Path(out)
    k = cfg.run.cv_folds
    dev = []
    for fold in range(k):
        run_dir = out / f"fold{fold}"
        if not (run_dir / "metrics.json").is_file():
            resume = (run_dir / "checkpoints" / "last.pt").is_file()
            log.info("cross-validation: fold %d/%d → %s%s", fold + 1, k, run_dir, " (resuming)" if resume else "")
            if resume:
                Trainer.from_run_dir(run_dir, dist=dist).fit()
            else:
                Trainer(fold_config(cfg, fold, run_dir), run_dir, dist=dist).fit()
        dev.append(json.loads((run_dir / "metrics.json").read_text())["dev"])
    summary = {"folds": k, "cv_seed": cfg.run.cv_seed, "seed": cfg.run.seed, **summarize(dev), "dev": dev}
    task = "regression" if "mae" in dev[0] else "classification"
    summary["select_metric"] = select_metric(cfg, task)
    if dist is None or dist.is_main:
        (out / CV_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    m = summary["select_metric"]
    log.info("cross-validation (%d folds): dev %s %.4f ± %.4f (mean ± std over folds)", k, m, summary["mean"][m],
             summary["std"][m])
    return summary
