"""Cross-validation folds of train+dev (mmsenti.experiment.cv, run.cv_folds)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mmsenti.config import ConfigError, load_config
from mmsenti.data.base import Sample
from mmsenti.data.splits import fold_bundle, make_folds, pooled
from mmsenti.train.trainer import build_dataset


def _samples(counts: dict[int, int]) -> list[Sample]:
    out = []
    for label, n in counts.items():
        out += [Sample(id=f"{label}-{i}", label=label, text="x") for i in range(n)]
    return out


def test_folds_are_disjoint_stratified_cover_everything_and_deterministic():
    samples = _samples({0: 57, 1: 31, 2: 15})
    folds = make_folds(samples, 5, seed=0)
    ids = [s.id for f in folds for s in f]
    assert len(ids) == len(set(ids)) == len(samples)  # disjoint, and cover every post
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for label in (0, 1, 2):  # each class spread evenly: counts per fold differ by at most one
        per_fold = [sum(s.label == label for s in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1, (label, per_fold)
    assert [[s.id for s in f] for f in make_folds(samples, 5, seed=0)] == [[s.id for s in f] for f in folds]
    assert [[s.id for s in f] for f in make_folds(samples, 5, seed=1)] != [[s.id for s in f] for f in folds]


def test_regression_folds_are_stratified_by_rounded_score():
    rng = np.random.default_rng(0)
    samples = [Sample(id=str(i), label=float(v)) for i, v in enumerate(rng.normal(0, 1.5, 200))]
    folds = make_folds(samples, 4, seed=0, task="regression")
    for cls in range(-3, 4):
        per_fold = [sum(int(np.round(np.clip(s.label, -3, 3))) == cls for s in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1


def test_fold_bundle_uses_train_and_dev_only_and_never_test(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "data.num_test=20"])
    bundle = build_dataset(cfg)
    test_ids = {s.id for s in bundle.split("test")}
    everything = {s.id for s in pooled(bundle)}
    devs = []
    for k in range(3):
        fb = fold_bundle(bundle, 3, k, seed=0)
        assert set(fb.splits) == {"train", "dev"}  # no test split: a fold run cannot score it
        train, dev = {s.id for s in fb.split("train")}, {s.id for s in fb.split("dev")}
        assert not train & dev and train | dev == everything and not (train | dev) & test_ids
        devs.append(dev)
    assert set().union(*devs) == everything and sum(map(len, devs)) == len(everything)
    # the trainer's data path applies the folds from the config
    cv = build_dataset(load_config(None, [*tiny_overrides, "run.cv_folds=3", "run.cv_fold=1"]))
    assert "test" not in cv.splits and {s.id for s in cv.split("dev")} == devs[1]
    with pytest.raises(ConfigError, match="run.cv_fold"):
        fold_bundle(bundle, 3, 3)


@pytest.mark.shared_data
def test_cm_memes_folds_exclude_the_official_test_posts(shared_data):
    cfg = load_config(None, ["data.name=cm-memes", f"data.root={shared_data / 'cm_memes'}", "model.modalities=[text]"])
    bundle = build_dataset(cfg)
    folds = make_folds(pooled(bundle), 5, seed=0)
    ids = {s.id for f in folds for s in f}
    assert len(ids) == 858 and not ids & {s.id for s in bundle.split("test")}
    totals = Counter(s.label for s in pooled(bundle))
    for f in folds:
        for label, n in totals.items():
            assert abs(sum(s.label == label for s in f) - n / 5) <= 1


def test_train_with_cv_folds_trains_every_fold_and_reports_the_mean(tiny_overrides, tmp_path):
    from mmsenti.cli import main

    out = tmp_path / "cv"
    sets = [a for o in [*tiny_overrides, "optim.epochs=1", "data.num_train=40", "run.cv_folds=2"] for a in ("--set", o)]
    assert main(["train", "--config", "configs/quickstart.yaml", *sets, "--out", str(out)]) == 0
    summary = json.loads((out / "cv.json").read_text())
    folds = [json.loads((out / f"fold{k}" / "metrics.json").read_text()) for k in range(2)]
    assert all(set(m) == {"dev"} for m in folds)  # fold runs never score test
    assert summary["mean"]["f1_weighted"] == pytest.approx(np.mean([m["dev"]["f1_weighted"] for m in folds]))
    assert (out / "fold1" / "predictions" / "dev.npz").is_file()
    assert not (out / "fold1" / "predictions" / "test.npz").exists()
