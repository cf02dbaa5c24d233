"""Splits of a dataset, cut deterministically from the posts' ids and a seed.

* Split carving, for releases that ship no (or not every) split: :func:`carve_split` takes a stratified share off
  a list, :func:`random_splits` makes train/dev/test, :func:`split_by_id_lists` follows a release's id lists.
* Cross-validation folds (``run.cv_folds``): :func:`make_folds` cuts train+dev into K stratified folds and
  :func:`fold_bundle` is the dataset one fold trains on. The folds depend only on the pooled posts and
  ``run.cv_seed``, never on the training seed or the configuration, so every seed and every configuration of an
  experiment sees the same folds. Training every fold is :mod:`mmsenti.experiment.cv`'s.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mmsenti.data.base import DatasetBundle, Sample
from mmsenti.errors import ConfigError, DataError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ carving
def carve_split(samples: Sequence[Sample], fraction: float, seed: int, stratify: bool = True) -> tuple[list, list]:
    """Split off ``fraction`` of ``samples`` deterministically: ``(rest, carved)``, both in the input order.

    ``round(fraction * n)`` samples are carved. Stratified by label, each class gives its share rounded down and
    the remaining places go to the classes with the largest remainders (ties in label order), so even a small
    dev split keeps the class balance. Which samples a class gives depends only on ``seed`` and the ids.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction must be in (0, 1), got {fraction}")
    groups: dict[Any, list[str]] = defaultdict(list)
    for s in samples:
        groups[s.label if stratify else None].append(s.id)
    labels = sorted(groups, key=repr)
    quota = {k: fraction * len(groups[k]) for k in labels}
    take = {k: int(quota[k]) for k in labels}
    spare = round(fraction * len(samples)) - sum(take.values())
    for k in sorted(labels, key=lambda k: -(quota[k] - take[k]))[: max(0, spare)]:  # stable: label order on ties
        take[k] += 1
    chosen: set[str] = set()
    for k in labels:
        ids = sorted(groups[k])
        random.Random(f"{seed}/{k!r}").shuffle(ids)
        chosen.update(ids[: take[k]])
    return [s for s in samples if s.id not in chosen], [s for s in samples if s.id in chosen]


def random_splits(samples: Sequence[Sample], seed: int, fractions: tuple[float, float] = (0.1, 0.1),
                  stratify: bool = True) -> dict[str, list[Sample]]:
    """Deterministic stratified train/dev/test (default 8:1:1) for releases that ship no split lists."""
    rest, test = carve_split(samples, fractions[1], seed, stratify)
    train, dev = carve_split(rest, fractions[0] / (1.0 - fractions[1]), seed + 1, stratify)
    return {"train": train, "dev": dev, "test": test}


def split_by_id_lists(samples: Iterable[Sample], lists: dict[str, list[str]], where: str) -> dict[str, list[Sample]]:
    """Assign samples to splits by id lists (in the lists' order); ids the lists name but the data lacks are logged."""
    by_id = {s.id: s for s in samples}
    out: dict[str, list[Sample]] = {}
    for split, ids in lists.items():
        found = [by_id[i] for i in ids if i in by_id]
        if len(found) < len(ids):
            lost = [i for i in ids if i not in by_id]
            log.warning("%s: %d id(s) of the %s list are not in the data (first: %s)", where, len(lost), split,
                        ", ".join(lost[:5]))
        out[split] = found
    unused = len(by_id) - len({i for ids in lists.values() for i in ids} & by_id.keys())
    if unused:
        log.info("%s: %d post(s) are in no split list and are left out", where, unused)
    return out


# ------------------------------------------------------------------------------------------------ folds
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
