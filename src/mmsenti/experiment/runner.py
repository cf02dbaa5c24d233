"""`mmsenti experiment run`: every row × seed of an experiment file as its own `mmsenti train` process.

* Resumable: a finished run (``metrics.json``) is skipped, a killed one resumes from its last checkpoint, and a
  run directory holding another configuration is an error rather than a silent reuse.
* Runs end with the runner: each is started through :mod:`mmsenti.experiment.lifeline`, so killing the runner
  (``kill -9`` included) stops its runs rather than leaving them training as orphans that hold their run
  directories; a rerun resumes them.
* ``--lanes N`` runs N processes side by side with ``threads`` = cores / N torch threads each (OMP_NUM_THREADS).
  A run's results do not depend on its lane; they may differ in the last digits between thread counts.
* Before anything starts, every row is checked for what it needs (weights, images, splits); rows that cannot
  run here are refused in one line that lists what is missing.
* Finished runs made before runs kept their per-post predictions get them from their saved model (an
  `mmsenti evaluate` process), so significance tests can be computed for them.
* Cross-validation experiments first run every fold of every row, then train the row each decision selects on
  the normal split and score it on test (see :mod:`mmsenti.experiment.cv`).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from mmsenti.config import ConfigError
from mmsenti.experiment.jobs import Job, RunResult, duration, result
from mmsenti.experiment.spec import Experiment, Row

Echo = Callable[[str], None]


# ------------------------------------------------------------------------------------------------------- plan
def plan(exp: Experiment, rows: list[Row], seeds: list[int] | None = None) -> list[Job]:
    """The first phase's runs, seed by seed (so a partial run still gives every row): rows × seeds (× folds)."""
    cv = exp.spec.cv
    if cv is None:
        order = sorted({s for r in rows for s in exp.seeds(r, seeds)})
        return [Job(exp, r, s) for s in order for r in rows if s in exp.seeds(r, seeds)]
    cv_seeds = seeds if seeds is not None else cv.seeds if cv.seeds is not None else exp.spec.seeds
    return [Job(exp, r, s, f) for s in cv_seeds for r in rows for f in range(cv.folds)]


def cv_seeds(exp: Experiment, seeds: list[int] | None = None) -> list[int]:
    cv = exp.spec.cv
    return list(seeds if seeds is not None else cv.seeds if cv and cv.seeds is not None else exp.spec.seeds)


@dataclass
class Outcome:
    """A cross-validation decision: each row's mean dev metric over its fold runs, and the selected row."""

    name: str
    metric: str
    scores: dict[str, list[float]]  # row → per seed, the mean over folds of the fold runs' dev metric
    runs: dict[str, list[float]]  # row → every fold run's dev metric
    selected: str | None  # None while some fold run is missing

    def mean(self, row: str) -> float:
        return statistics.fmean(self.scores[row])


def decide(exp: Experiment, seeds: list[int] | None = None) -> list[Outcome]:
    """The outcome of every cross-validation decision from the finished fold runs."""
    from mmsenti.metrics import higher_is_better
    from mmsenti.train.trainer import select_metric

    cv = exp.spec.cv
    if cv is None:
        return []
    out = []
    for d in cv.decisions:
        first = exp.row(d.rows[0])
        metric = d.metric if d.metric != "auto" else select_metric(exp.configs[first.id], exp.task(first))
        scores: dict[str, list[float]] = {}
        runs: dict[str, list[float]] = {}
        complete = True
        for row_id in d.rows:
            row = exp.row(row_id)
            scores[row_id], runs[row_id] = [], []
            for s in cv_seeds(exp, seeds):
                folds = [result(Job(exp, row, s, f)) for f in range(cv.folds)]
                if any(r is None for r in folds):
                    complete = False
                    continue
                values = [r.dev[metric] for r in folds if r is not None]
                scores[row_id].append(statistics.fmean(values))
                runs[row_id].extend(values)
        selected = None
        if complete:
            pick = max if higher_is_better(metric) else min
            selected = pick(d.rows, key=lambda r: statistics.fmean(scores[r]))
        out.append(Outcome(d.name, metric, scores, runs, selected))
    return out


def final_jobs(exp: Experiment, rows: list[Row], outcomes: list[Outcome], seeds: list[int] | None = None) -> list[Job]:
    """Normal train/dev/test runs of the rows the decisions selected (among ``rows``), once per seed."""
    if exp.spec.cv is None or exp.spec.cv.test == "none":
        return []
    chosen = [o.selected for o in outcomes if o.selected]
    picked = [r for r in rows if r.id in chosen]
    return [Job(exp, r, s) for s in sorted({s for r in picked for s in exp.seeds(r, seeds)})
            for r in picked if s in exp.seeds(r, seeds)]


# -------------------------------------------------------------------------------------------------- preflight
def missing(exp: Experiment, rows: list[Row]) -> dict[str, list[str]]:
    """Row id → what it needs that this machine lacks (pretrained weights, a dataset, its images, a split)."""
    from mmsenti.backbones.weights import hub_online
    from mmsenti.data.base import DataError
    from mmsenti.registry import DATASETS

    bundles: dict[str, object] = {}
    weights: dict[tuple, str | None] = {}
    out: dict[str, list[str]] = {}
    for row in rows:
        cfg = exp.configs[row.id]
        problems = []
        for need in _backbones(cfg):
            if need not in weights:
                weights[need] = _weights_problem(*need, online=hub_online)
            if weights[need]:
                problems.append(weights[need])
        key = repr(cfg.data)
        if key not in bundles:
            try:
                bundles[key] = DATASETS.get(cfg.data.name).builder(cfg.data)
            except DataError as e:
                bundles[key] = f"{cfg.data.name} data ({e})"
        bundle = bundles[key]
        if isinstance(bundle, str):
            problems.append(bundle)
        else:
            problems += [f"{cfg.data.name} {'images' if m == 'image' else m}" for m in cfg.model.data_modalities()
                         if m not in bundle.modalities]
            problems += [f"{cfg.data.name} {s} split" for s in ("train", "dev") if not bundle.splits.get(s)]
        if problems:
            out[row.id] = problems
    return out


def _backbones(cfg) -> list[tuple[str, str, object]]:
    """(kind, name, pretrained) of every pretrained backbone a config loads."""
    m = cfg.model
    out = []
    reads_text = "text" in m.modalities and getattr(m, "text_input", "tokens") == "tokens"
    if reads_text and m.text_encoder.name != "tiny-bert" and m.text_encoder.pretrained not in (False, None):
        out.append(("text", m.text_encoder.name, m.text_encoder.pretrained))
    image = m.image_encoder
    if "image" in m.modalities and image.name not in ("small-cnn", "tags") and image.pretrained not in (False, None):
        out.append(("image", image.name, image.pretrained))
    clip = getattr(m, "clip", None)
    both = {"text", "image"} <= set(m.modalities)
    uses_clip = getattr(m, "use_clip", False) and getattr(m, "use_gam", False) and both
    if uses_clip and clip.name != "tiny-random" and clip.pretrained not in (False, None):
        out.append(("clip", clip.name, clip.pretrained))
    return out


def _weights_problem(kind: str, name: str, pretrained, online: Callable[[], bool]) -> str | None:
    from mmsenti.backbones.build import resolve_backbone_weights
    from mmsenti.backbones.weights import MissingWeightsError

    try:
        resolve_backbone_weights(name, pretrained, kind=kind, download=False)
        return None
    except MissingWeightsError:
        return None if online() else f"{name} weights"
    except ConfigError as e:
        return f"{name} weights ({e})"


def refusal(exp: Experiment, problems: dict[str, list[str]], rows: list[Row]) -> str:
    """One line: which rows cannot run here and everything they lack."""
    what = list(dict.fromkeys(p for ps in problems.values() for p in ps))
    names = ", ".join(problems) if len(problems) <= 6 else f"{', '.join(list(problems)[:6])}, …"
    hint = ("weights: $MMSENTI_WEIGHTS_DIR or model.*.pretrained, docs/backbones.md; " if any(
        p.endswith(" weights") or " weights (" in p for p in what) else "")
    rest = "" if len(problems) == len(rows) else "; leave them out with --only"
    return (f"{exp.path}: {len(problems)} of {len(rows)} rows cannot run here ({names}): missing "
            f"{'; '.join(what)} ({hint}data: data.root){rest}")


# -------------------------------------------------------------------------------------------------- execution
@dataclass
class Task:
    label: str
    argv: list[str]
    log: Path
    row: str
    job: Job | None = None  # a training run (None: filling in predictions)


@dataclass
class Progress:
    """Counts and durations behind the progress lines: runs finished of all, and an estimate of the time left."""

    total: int
    finished: int
    lanes: int
    durations: dict[str, list[float]] = field(default_factory=dict)

    def estimate(self, row: str) -> float | None:
        if self.durations.get(row):
            return statistics.fmean(self.durations[row])
        every = [d for ds in self.durations.values() for d in ds]
        return statistics.fmean(every) if every else None

    def left(self, queued: list[Task], running: dict[str, float]) -> str:
        """Estimated time left: the runs queued and the rest of those running, spread over the lanes."""
        now = time.time()
        ests = [self.estimate(t.row) for t in queued if t.job] + [
            None if (e := self.estimate(row)) is None else max(0.0, e - (now - t0)) for row, t0 in running.items()]
        if not ests:
            return "nothing left"
        if any(e is None for e in ests):
            return "time left known after the first run"
        return f"~{_hms(sum(ests) / min(self.lanes, len(ests)))} left"  # type: ignore[arg-type]


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _env(threads: int) -> dict[str, str]:
    import mmsenti

    src = str(Path(mmsenti.__file__).resolve().parents[1])  # the children import this same mmsenti
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


_LIFELINE = Path(__file__).with_name("lifeline.py")


def _tied(argv: list[str]) -> list[str]:
    """``argv`` started through lifeline.py, so that it ends when this process does (see that module)."""
    return [sys.executable, "-I", "-S", str(_LIFELINE), str(os.getpid()), *argv]


def execute(tasks: list[Task], progress: Progress, lanes: int, threads: int, echo: Echo) -> list[str]:
    """Run ``tasks`` in ``lanes`` processes at a time; returns one line per failure."""
    env = _env(threads)
    failures: list[str] = []
    queued = list(tasks)
    running: dict[Future, tuple[Task, float]] = {}
    procs: dict[int, subprocess.Popen] = {}
    lock = threading.Lock()

    def launch(task: Task) -> int:
        task.log.parent.mkdir(parents=True, exist_ok=True)
        with open(task.log, "a") as log:
            log.write(f"$ {' '.join(task.argv)}\n")
            log.flush()
            # Started and waited for by this lane thread: on Linux the run's tie is to this thread (lifeline.py).
            proc = subprocess.Popen(_tied(task.argv), stdout=log, stderr=subprocess.STDOUT, env=env)
            with lock:
                procs[id(task)] = proc
            return proc.wait()

    with ThreadPoolExecutor(max_workers=lanes) as pool:
        try:
            while queued or running:
                while queued and len(running) < lanes:
                    task = queued.pop(0)
                    echo(f"[{time.strftime('%H:%M:%S')}] start {task.label}  (log: {task.log})")
                    running[pool.submit(launch, task)] = (task, time.time())
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    task, t0 = running.pop(fut)
                    code, took = fut.result(), time.time() - t0
                    if code == 0 and (task.job is None or task.job.finished):
                        status = f"done {task.label} in {_hms(took)}"
                        if task.job:
                            progress.finished += 1
                            progress.durations.setdefault(task.row, []).append(took)
                            status += _headline(result(task.job))
                    else:
                        status = f"FAILED {task.label} after {_hms(took)} (exit {code}: {_last_line(task.log)})"
                        failures.append(f"{task.label}: exit {code}, see {task.log}")
                    left = progress.left(queued, {t.row: t0 for t, t0 in running.values()})
                    echo(f"[{time.strftime('%H:%M:%S')}] {status} | {progress.finished}/{progress.total} runs "
                         f"finished, {len(running)} running, {left}")
        except KeyboardInterrupt:
            queued.clear()
            with lock:
                for proc in procs.values():
                    if proc.poll() is None:
                        proc.terminate()
            raise
    return failures


def _headline(r: RunResult | None) -> str:
    if r is None:
        return ""
    split, metrics = ("test", r.test) if r.test else ("dev", r.dev)
    key = "mae" if "mae" in metrics else "f1_weighted" if "f1_weighted" in metrics else None
    return f" ({split} {key} {metrics[key]:.4f})" if key else ""


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _train_task(job: Job) -> Task:
    return Task(job.label + (" (resuming)" if job.started else ""), job.command(), job.log_file, job.row.id, job)


def _backfill_task(r: RunResult) -> Task:
    splits = ["dev"] if r.test is None else ["dev", "test"]
    argv = [sys.executable, "-m", "mmsenti", "evaluate", str(r.job.run_dir), "--split", *splits,
            "--predictions", str(r.job.run_dir / "predictions")]
    return Task(f"{r.job.label}: predictions from the saved model", argv, r.job.log_file, r.job.row.id)


# -------------------------------------------------------------------------------------------------------- run
def run_experiment(exp: Experiment, *, only: list[str] | None = None, seeds: list[int] | None = None, lanes: int = 1,
                   threads: int | None = None, dry_run: bool = False, echo: Echo = print) -> int:
    """Run what is missing of ``exp`` (the rows ``only`` names, at ``seeds``); returns the process exit code."""
    if lanes < 1:
        raise ConfigError(f"--lanes: must be >= 1, got {lanes}")
    rows = exp.select(only)
    threads = threads or max(1, (os.cpu_count() or 1) // lanes)
    failures: list[str] = []
    phases = ["runs"] if exp.spec.cv is None else ["cross-validation fold runs", "test runs of the selected rows"]
    for phase in phases:
        if phase.startswith("test"):
            outcomes = decide(exp, seeds)
            for o in outcomes:
                echo(f"{o.name}: " + (f"selected {o.selected} (mean dev {o.metric} over folds: "
                                      + ", ".join(f"{r} {o.mean(r):.4f}" for r in o.scores) + ")"
                                      if o.selected else "not decided yet (fold runs missing)"))
            jobs = final_jobs(exp, rows, outcomes, seeds)
        else:
            jobs = plan(exp, rows, seeds)
        for job in jobs:
            job.check_config()
        done = [j for j in jobs if j.finished]
        todo = [j for j in jobs if not j.finished]
        backfill = [r for r in map(result, done) if r is not None and not r.has_predictions()]
        n_rows = len({j.row.id for j in jobs})
        echo(f"{exp.path}: {phase}: {n_rows} rows, {len(jobs)} runs: {len(done)} finished, {len(todo)} to run"
             + (f", {len(backfill)} to fill in predictions" if backfill else "")
             + (f"; {lanes} lane{'s' * (lanes > 1)} × {threads} thread{'s' * (threads > 1)}"
                if todo or backfill else ""))
        if todo:
            problems = missing(exp, [r for r in rows if r.id in {j.row.id for j in todo}])
            if problems:
                raise ConfigError(refusal(exp, problems, sorted({j.row.id: j.row for j in todo}.values(),
                                                                key=lambda r: r.id)))
        tasks = [_backfill_task(r) for r in backfill] + [_train_task(j) for j in todo]
        if dry_run:
            for t in tasks:
                echo("  " + " ".join(t.argv[2:]))
            if phase.startswith("cross") and exp.spec.cv.test == "selected":
                echo("  then: the selected row of each decision, trained on the normal split and scored on test")
            continue
        if not tasks:
            continue
        progress = Progress(len(jobs), len(done), lanes)
        for j in done:
            if (d := duration(j)) is not None:
                progress.durations.setdefault(j.row.id, []).append(d)
        failures += execute(tasks, progress, lanes, threads, echo)
        if failures and phase.startswith("cross"):
            break  # no selection from an incomplete cross-validation
    if failures:
        echo(f"{len(failures)} failed:\n  " + "\n  ".join(failures))
        return 1
    return 0
