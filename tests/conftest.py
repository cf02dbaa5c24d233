"""Shared fixtures: a tiny scenes configuration that trains in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers), each worker and the processes its tests start run one
    thread unless OMP_NUM_THREADS says otherwise: two workers of two threads each on two cores wait for each other at
    every op. (No test's outcome may depend on this: the suite is also run at OMP_NUM_THREADS=1 and 2.)"""
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


# Small enough for seconds per run, large enough that late fusion learns something in a few epochs. A test that
# trains another model names its tiny variant after these (`model.name=infig-tiny`), never the bare model.
TINY = [
    "data.num_train=96", "data.num_dev=32", "data.num_test=32", "data.batch_size=16", "data.eval_batch_size=32",
    "model.name=late-fusion-tiny", "optim.epochs=2", "run.quiet=true", "run.log_every=1000",
]


# Late fusion on scenes, trained once per session for the tests that need a *trained* model (explanations that follow
# the scenes rule, int8 export keeping a trained model's answers): 100 % dev accuracy from epoch 5 (~15 s on one
# core), so its decisions have margins, not near-ties.
SCENES_TRAINED = [
    "data.num_train=1200", "data.num_dev=100", "data.num_test=300", "data.batch_size=32", "data.image_size=32",
    "model.name=late-fusion-tiny", "model.hidden=64", "optim.epochs=8", "optim.lr=2e-3", "run.log_every=1000",
]


def build_tiny(name: str, bundle, *overrides: str, seed: int = 0):
    """``(config, model, processor)``: registered model ``name``'s tiny variant (``<name>-tiny``) with ``overrides``,
    its vocabulary learned on ``bundle``'s training texts and its weights drawn from ``seed``, as training builds it."""
    import torch

    from mmsenti import create_model
    from mmsenti.config import load_config

    cfg = load_config(None, [f"model.name={name}-tiny", *overrides])
    torch.manual_seed(seed)
    model, processor = create_model(cfg, texts=[s.text or "" for s in bundle.split("train")],
                                    label_names=bundle.label_names, task=bundle.task)
    return cfg, model, processor


def train_scenes(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    """Train ``configs/quickstart.yaml`` with ``overrides`` through the CLI; the run directory."""
    from mmsenti.cli import main

    run = tmp_path_factory.mktemp(name) / "run"
    argv = ["train", "--config", str(ROOT / "configs/quickstart.yaml"), "--out", str(run), "--quiet"]
    assert main(argv + [x for o in overrides for x in ("--set", o)]) == 0
    return run


@pytest.fixture(scope="session")
def scenes_late_fusion(tmp_path_factory) -> Path:
    """The run directory of late fusion trained on scenes with ``SCENES_TRAINED`` (read it; copy it to change it)."""
    return train_scenes(tmp_path_factory, "scenes-late-fusion", SCENES_TRAINED)


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


# The scenes posts with tags (words of the weather each image shows, among unrelated ones) and the tags image
# encoder: late fusion reads the text and the tags. Trained once per session for the tests of a tags model (train,
# save, load, predict, serve, explain, export): 100 % dev accuracy from epoch 8, test 98.7 % (~11 s on one core).
SCENES_TAGS = [*SCENES_TRAINED, "data.tags=true", "model.image_encoder.name=tags", "model.image_encoder.max_tags=6",
               "model.image_encoder.tag_dim=64", "optim.lr=5e-3", "optim.epochs=12"]


@pytest.fixture(scope="session")
def scenes_tags(tmp_path_factory) -> Path:
    """The run directory of late fusion over text + tags trained on scenes with ``SCENES_TAGS`` (read it only)."""
    return train_scenes(tmp_path_factory, "scenes-tags", SCENES_TAGS)
