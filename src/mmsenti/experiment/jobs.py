"""An experiment's jobs (one training run each: a row at a seed, and a fold): where each runs and what a finished
one holds. :mod:`mmsenti.experiment.runner` runs them; :mod:`mmsenti.experiment.table` reads their results.

Layout under the experiment's ``runs`` directory::

    <row>/seed<S>/                  a normal run (train/dev/test): metrics.json, predictions/{dev,test}.npz, model/
    <row>/seed<S>.log               the run's console output (written by `mmsenti experiment run`)
    <row>/cv<K>/seed<S>-fold<i>/    a cross-validation fold run (train/dev only): metrics.json, predictions/dev.npz

A run is finished when its ``metrics.json`` exists (the trainer writes it last but one, after the predictions).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mmsenti.config import ConfigError, config_from_json, load_config
from mmsenti.experiment.spec import Experiment, Row
from mmsenti.metrics import Predictions

# Settings that do not change what a run computes: a finished run made with other values is still the same run.
_NOT_RESULTS = {"out", "quiet", "threads", "log_every", "checkpoint_every", "feature_cache", "cache_dir"}


@dataclass(frozen=True)
class Job:
    """One training run of an experiment: a row at a seed (and, for cross-validation, a fold)."""

    exp: Experiment
    row: Row
    seed: int
    fold: int | None = None

    @property
    def folds(self) -> int:
        return self.exp.spec.cv.folds if self.exp.spec.cv else 0

    @property
    def run_dir(self) -> Path:
        base = self.exp.runs_dir / self.row.id
        if self.fold is None:
            return base / f"seed{self.seed}"
        return base / f"cv{self.folds}" / f"seed{self.seed}-fold{self.fold}"

    @property
    def log_file(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")

    @property
    def label(self) -> str:
        fold = "" if self.fold is None else f" fold {self.fold + 1}/{self.folds}"
        return f"{self.row.id} seed {self.seed}{fold}"

    def overrides(self) -> list[str]:
        """Every --set of the run: the experiment's and the row's, then seed, cross-validation fold and output."""
        cv = [] if self.fold is None else [f"run.cv_folds={self.folds}", f"run.cv_fold={self.fold}",
                                           f"run.cv_seed={self.exp.spec.cv.seed}"]
        return [*self.exp.overrides(self.row), f"run.seed={self.seed}", *cv, f"run.out={self.run_dir}"]

    @property
    def finished(self) -> bool:
        return (self.run_dir / "metrics.json").is_file()

    @property
    def started(self) -> bool:
        return (self.run_dir / "checkpoints" / "last.pt").is_file()

    def command(self) -> list[str]:
        """The `mmsenti` command that (re)starts this run, as an argument list for subprocess."""
        head = [sys.executable, "-m", "mmsenti"]
        if self.started:
            return [*head, "train", "--resume", "--out", str(self.run_dir), "--quiet"]
        sets = [a for o in self.overrides() for a in ("--set", o)]
        return [*head, "train", "--config", relative(self.exp.config_path(self.row)), *sets, "--quiet"]

    def check_config(self) -> None:
        """A run already in ``run_dir`` must be of this job's configuration, else it would be reused wrongly: by
        `experiment run` (resumed or skipped) and by `experiment table` (its figures shown under this row's command).

        A match is remembered per experiment (by the saved file's mtime), since tables read a run several times.
        """
        saved = self.run_dir / "config.json"
        if not saved.is_file():
            return
        stamp = (str(self.run_dir), saved.stat().st_mtime_ns)
        if stamp in self.exp.checked_runs:
            return
        try:
            have = _comparable(config_from_json(saved).to_dict())
        except ConfigError:
            if not self.started and not self.finished:
                return  # killed while its config was being written: nothing to reuse, it starts afresh
            raise
        want = _comparable(load_config(self.exp.config_path(self.row), self.overrides()).to_dict())
        if want != have:
            key = next(_differences(want, have), "?")
            raise ConfigError(f"{self.run_dir} holds a run of another configuration than row {self.row.id!r} "
                              f"({key}); move it away or give the experiment another `runs:` directory")
        self.exp.checked_runs.add(stamp)


def _comparable(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    for k in _NOT_RESULTS:
        cfg["run"].pop(k, None)
    return cfg


def _differences(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    elif a != b:
        yield f"{prefix}: {b!r} there, {a!r} here"


@dataclass
class RunResult:
    """A finished run's metrics and where its predictions are."""

    job: Job
    dev: dict
    test: dict | None

    def predictions(self, split: str) -> Predictions | None:
        path = self.job.run_dir / "predictions" / f"{split}.npz"
        return Predictions.load(path) if path.is_file() else None

    def has_predictions(self) -> bool:
        splits = ["dev"] if self.test is None else ["dev", "test"]
        return all((self.job.run_dir / "predictions" / f"{s}.npz").is_file() for s in splits)


def result(job: Job) -> RunResult | None:
    """The finished run's metrics (None while unfinished). A run of another configuration is refused
    (:meth:`Job.check_config`), so no table shows its figures under this row's command."""
    path = job.run_dir / "metrics.json"
    if not path.is_file():
        return None
    job.check_config()
    metrics = json.loads(path.read_text())
    return RunResult(job, metrics.get("dev", {}), metrics.get("test"))


def duration(job: Job) -> float | None:
    """Seconds a finished run took (start to metrics.json), from its run_info.json; None when unknown."""
    import time

    try:
        info = json.loads((job.run_dir / "run_info.json").read_text())
        start = time.mktime(time.strptime(info["started"], "%Y-%m-%d %H:%M:%S"))
        return max(0.0, os.path.getmtime(job.run_dir / "metrics.json") - start)
    except (OSError, ValueError, KeyError):
        return None


def relative(path: Path) -> str:
    """``path`` relative to where mmsenti runs when it lies below it (shorter commands), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def display_command(exp: Experiment, row: Row, cv: bool = False) -> str:
    """The row's command as a reader types it (from where mmsenti runs), seed written S."""
    config = relative(exp.config_path(row))
    cv_sets = ""
    if cv and exp.spec.cv:
        cv_sets = f" --set run.cv_folds={exp.spec.cv.folds}" + (
            f" --set run.cv_seed={exp.spec.cv.seed}" if exp.spec.cv.seed else "")
    sets = "".join(f" --set {o}" for o in exp.overrides(row))
    return f"mmsenti train --config {config}{sets} --set run.seed=S{cv_sets}"
