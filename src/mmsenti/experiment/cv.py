"""K-fold cross-validation on train+dev: for small datasets whose dev split is too small to rank configurations.

The dataset's train and dev splits are pooled and cut into K stratified folds; a fold run trains on K-1 folds,
selects its epoch on the remaining one (its dev split) and never loads the test split. Configurations are then
compared on the mean dev metric over the folds, and only the selected configuration is scored on test (by the
experiment runner, with a normal train/dev run: see docs/experiments.md).

The folds depend only on the pooled posts and ``run.cv_seed``, never on the training seed or the configuration,
so every seed and every configuration of an experiment sees the same folds: comparisons between them are paired.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmsenti.config import Config, ConfigError
from mmsenti.data.base import DataError, DatasetBundle, Sample

log = logging.getLogger(__name__)

CV_SUMMARY = "cv.json"  # written by train_folds into the parent run directory


def stratum(sample: Sample, task: str):
    """The class a sample is stratified by: its label, or for regression its score rounded to [-3, 3] (Acc-7)."""
    if task == "regression":
        return int(np.round(np.clip(float(sample.label), -3.0, 3.0)))
    return sample.label


def make_folds(samples: Sequence[Sample], k: int, seed: int, task: str = "classification") -> list[list[Sample]]:
    """Cut ``samples`` into ``k`` disjoint stratified folds covering them all, each in input order.

    Each class's posts are shuffled (by ``seed`` and the class) and dealt round-robin, continuing from where the
    previous class stopped, so every fold holds each class's count ±1 and the folds' sizes differ by at most 1.
    Which fold a post lands in depends only on ``seed`` and the ids of its class.
    """
    if k < 2:
        raise ConfigError(f"run.cv_folds: need at least 2 folds, got {k}")
    if len(samples) < k:
        raise DataError(f"cannot cut {len(samples)} posts into {k} folds")
    groups: dict = defaultdict(list)
    for s in samples:
        groups[stratum(s, task)].append(s.id)
    fold_of: dict[str, int] = {}
    slot = 0
    for label in sorted(groups, key=repr):
        ids = sorted(groups[label])
        random.Random(f"cv/{seed}/{label!r}").shuffle(ids)
        for i in ids:
            fold_of[i] = slot % k
            slot += 1
    folds: list[list[Sample]] = [[] for _ in range(k)]
    for s in samples:
        folds[fold_of[s.id]].append(s)
    return folds


def pooled(bundle: DatasetBundle) -> list[Sample]:
    """Train + dev of ``bundle`` (the posts cross-validation may use; never test)."""
    return [s for split in ("train", "dev") for s in bundle.splits.get(split, [])]


def fold_bundle(bundle: DatasetBundle, k: int, fold: int | None, seed: int = 0) -> DatasetBundle:
    """``bundle`` with train = the other folds of train+dev, dev = fold ``fold``, and no test split."""
    if fold is None:
        raise ConfigError("run.cv_fold: not set (a single training run trains one fold; `mmsenti train` with "
                          "run.cv_folds and no run.cv_fold trains them all)")
    if not 0 <= fold < k:
        raise ConfigError(f"run.cv_fold: must be in [0, {k}), got {fold}")
    folds = make_folds(pooled(bundle), k, seed, bundle.task)
    train = [s for i, f in enumerate(folds) if i != fold for s in f]
    return DatasetBundle(bundle.name, {"train": train, "dev": folds[fold]}, bundle.task, bundle.label_names,
                         bundle.modalities, list(bundle.sources))


def fold_config(cfg: Config, fold: int, out: Path) -> Config:
    """A copy of ``cfg`` that trains fold ``fold`` into ``out``."""
    from mmsenti.config import build_config

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
