"""`mmsenti experiment run/table` end to end on tiny scenes rows: resume, lanes, tables from the runs, CV, plots."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from mmsenti.config import ConfigError
from mmsenti.experiment import load_experiment
from mmsenti.experiment.jobs import Job
from mmsenti.experiment.plots import experiment_bar_charts
from mmsenti.experiment.runner import run_experiment
from mmsenti.experiment.table import collect, markdown, to_csv, to_latex, write

pytestmark = pytest.mark.slow

# For every row; each row's model is its tiny variant (the row's own `set`).
TINY = ["data.num_train=48", "data.num_dev=16", "data.num_test=24", "data.batch_size=16", "data.eval_batch_size=32",
        "optim.epochs=1", "run.log_every=1000"]


def experiment_file(directory: Path, name: str, runs: str, extra: str = "", sets: list[str] = TINY) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(f"""name: tiny
runs: {directory / runs}
seeds: [0, 1]
set: {json.dumps(sets)}
rows:
  - {{id: fusion, group: scenes, name: late fusion, config: {ROOT}/configs/quickstart.yaml,
      set: [model.name=late-fusion-tiny]}}
  - {{id: text, group: scenes, name: text only, config: {ROOT}/configs/scenes/text-only.yaml,
      set: [model.name=text-only-tiny]}}
comparisons:
  - {{a: fusion, b: text, metrics: [f1_weighted, accuracy]}}
headline:
  - {{row: fusion, data: scenes, model: late fusion}}
{extra}""")
    return path


def cli(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "mmsenti", *args], cwd=cwd, capture_output=True, text=True, env=env,
                       timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"mmsenti {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                             f"{r.stderr[-2000:]}")
    return r


def run(path: Path, **kwargs) -> str:
    """`mmsenti experiment run` in this process (the runs themselves are still separate processes)."""
    lines: list[str] = []
    assert run_experiment(load_experiment(path), threads=1, echo=lines.append, **kwargs) == 0, "\n".join(lines)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    d = tmp_path_factory.mktemp("experiment")
    two, one = experiment_file(d, "two", "runs/two"), experiment_file(d, "one", "runs/one")
    first = cli(d, "experiment", "run", two.name, "--lanes", "2", "--threads", "1", "--seeds", "0").stdout
    stamps = {p: p.stat().st_mtime_ns for p in (d / "runs/two").glob("*/seed0/metrics.json")}
    resumed = run(two, lanes=2)
    again = run(two, lanes=2)
    run(one, lanes=1)
    return {"dir": d, "two": two, "one": one, "first": first, "resumed": resumed, "again": again, "stamps": stamps}


def test_resume_skips_finished_runs(grid):
    assert "2 rows, 2 runs: 0 finished, 2 to run" in grid["first"]  # --seeds 0
    assert len(grid["stamps"]) == 2
    assert "2 rows, 4 runs: 2 finished, 2 to run" in grid["resumed"]
    assert all(p.stat().st_mtime_ns == t for p, t in grid["stamps"].items())  # seed 0 was not run again
    assert "start fusion seed 1" in grid["resumed"] and "start fusion seed 0" not in grid["resumed"]
    assert "4 finished, 0 to run" in grid["again"] and "start" not in grid["again"]
    assert "4/4 runs finished" in grid["resumed"] and "left" in grid["resumed"]  # progress lines


def test_two_lanes_give_the_same_tables_as_one(grid):
    for fmt in (markdown, to_csv, to_latex):
        two, one = fmt(load_experiment(grid["two"])), fmt(load_experiment(grid["one"]))
        assert two == one and "late fusion" in two


def test_table_mean_and_std_are_those_of_the_runs_metrics(grid):
    d = grid["dir"]
    text = cli(d, "experiment", "table", grid["two"].name, "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(text.split("\n\n")[0])))
    assert [r["row"] for r in rows] == ["fusion", "text"]
    for r in rows:
        runs = [json.loads((d / "runs/two" / r["row"] / f"seed{s}" / "metrics.json").read_text())["test"]
                for s in (0, 1)]
        for k in ("accuracy", "f1_weighted", "f1_macro"):
            values = [m[k] for m in runs]
            assert float(r[f"{k}_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-6)
            assert float(r[f"{k}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
        assert int(r["seeds"]) == 2
    md = markdown(load_experiment(grid["two"]))
    f1 = [json.loads((d / "runs/two/fusion" / f"seed{s}" / "metrics.json").read_text())["test"]["f1_weighted"]
          for s in (0, 1)]
    assert f"{statistics.fmean(f1):.4f} ± {statistics.stdev(f1):.4f}" in md
    assert "| late fusion | text only | f1_weighted | test (24 posts) |" in md  # the paired comparison


def test_runs_keep_the_selected_models_predictions(grid):
    from mmsenti.config import config_from_json
    from mmsenti.metrics import Predictions
    from mmsenti.train.trainer import build_dataset

    run_dir = grid["dir"] / "runs/two/fusion/seed1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    bundle = build_dataset(config_from_json(run_dir / "config.json"))
    for split in ("dev", "test"):
        p = Predictions.load(run_dir / "predictions" / f"{split}.npz")
        assert list(p.ids) == [s.id for s in bundle.split(split)]
        assert list(p.labels) == [s.label for s in bundle.split(split)]
        assert p.metrics()["accuracy"] == metrics[split]["accuracy"]
        assert p.logits.shape == (len(p.ids), 3)


def test_paired_comparison_matches_the_runs(grid):
    from mmsenti.experiment.table import collect, compare

    exp = load_experiment(grid["two"])
    results = collect(exp)
    r = compare(exp, exp.spec.comparisons[0], results)["f1_weighted"]
    direct = statistics.fmean(x.test["f1_weighted"] for x in results["fusion"]) - \
        statistics.fmean(x.test["f1_weighted"] for x in results["text"])
    assert r.difference == pytest.approx(direct) and r.low <= r.difference <= r.high and r.seeds == 2


def test_a_run_directory_of_another_configuration_is_refused(grid, capsys):
    from mmsenti.cli import main

    changed = experiment_file(grid["dir"], "changed", "runs/two", sets=[*TINY, "optim.lr=0.5"])
    assert main(["experiment", "run", str(changed)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmsenti: error:") and "\n" not in err and "another configuration" in err
    assert "optim.lr" in err


def test_killed_runs_resume_from_their_checkpoint(tmp_path):
    exp = load_experiment(experiment_file(tmp_path, "x", "runs/x"))
    job = Job(exp, exp.rows[0], 0)
    assert "--config" in job.command() and not job.started
    (job.run_dir / "checkpoints").mkdir(parents=True)
    (job.run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    assert job.command()[-5:] == ["train", "--resume", "--out", str(job.run_dir), "--quiet"]


def test_only_selects_a_row_by_id_even_when_a_group_has_its_name(tmp_path):
    path = experiment_file(tmp_path, "x", "runs/x")
    assert [r.id for r in load_experiment(path).select(["scenes"])] == ["fusion", "text"]  # a group: all its rows
    # A row whose id is also its group's name (groups default to the dataset's name): --only ROW means that row.
    path.write_text(re.sub(r"(?<!-)\bfusion\b", "scenes", path.read_text()))  # the row, not late-fusion-tiny
    exp = load_experiment(path)
    assert [r.id for r in exp.select(["scenes"])] == ["scenes"]
    assert [r.id for r in exp.select(["scenes", "text"])] == ["scenes", "text"]
    with pytest.raises(ConfigError, match="--only 'nope'"):
        exp.select(["nope"])


def test_cross_validation_experiment_selects_on_the_mean_dev_metric_over_folds(grid):
    d = grid["dir"]
    cv = experiment_file(d, "cv", "runs/two", extra="""cv:
  folds: 2
  seeds: [0]
  decisions:
    - {name: fusion or text, rows: [fusion, text], note: "Asked after the test scores were seen."}
""")
    out = run(cv, lanes=2)
    assert "cross-validation fold runs: 2 rows, 4 runs: 0 finished, 4 to run" in out
    means = {}
    for row in ("fusion", "text"):
        folds = [json.loads((d / "runs/two" / row / "cv2" / f"seed0-fold{k}" / "metrics.json").read_text())
                 for k in range(2)]
        assert all(set(m) == {"dev"} for m in folds)  # fold runs never score test
        means[row] = statistics.fmean(m["dev"]["f1_weighted"] for m in folds)
    selected = max(means, key=means.get)
    assert f"selected {selected}" in out
    assert "test runs of the selected rows: 1 rows, 2 runs: 2 finished, 0 to run" in out  # made by the grid
    md = markdown(load_experiment(cv))
    line = next(ln for ln in md.splitlines() if ln.startswith("| late fusion | 2 × 1"))
    assert f"{means['fusion']:.4f} ±" in line
    assert ("✓" in line) == (selected == "fusion")
    assert "### fusion or text\n\nAsked after the test scores were seen.\n\n2-fold cross-validation" in md
    # the other row's test runs exist (made by the grid, outside this decision): shown, marked as not selected
    other = next(r for r in ("fusion", "text") if r != selected)
    name = {"fusion": "late fusion", "text": "text only"}
    f1 = [json.loads((d / "runs/two" / other / f"seed{s}" / "metrics.json").read_text())["test"]["f1_weighted"]
          for s in (0, 1)]
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name[other]} | 2 × 1"))
    assert f"| {statistics.fmean(f1):.4f} ± {statistics.stdev(f1):.4f} (2 seeds; not selected) |" in line
    assert "out-of-fold dev predictions" in md and "| 64 |" in md  # 48 + 16 train+dev posts, each once


def test_write_replaces_the_marked_blocks_only(grid, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- begin experiment tiny: tables (whatever) -->\nold\n"
                   "<!-- end experiment tiny: tables -->\nmiddle\n<!-- begin experiment tiny: headline -->\n"
                   "<!-- end experiment tiny: headline -->\noutro\n")
    assert write(load_experiment(grid["two"]), [doc]) == {str(doc): ["tables", "headline"]}
    text = doc.read_text()
    md = markdown(load_experiment(grid["two"]))
    assert text.startswith("intro\n<!-- begin experiment tiny: tables (whatever) -->\n### scenes")
    assert md.strip() in text and "old" not in text and text.endswith("<!-- end experiment tiny: headline -->\noutro\n")
    assert "| scenes | late fusion | 2 |" in text and "\nmiddle\n" in text


def test_evaluate_plots(grid, tmp_path):
    from PIL import Image

    from mmsenti.metrics import Predictions, softmax

    run_dir = grid["dir"] / "runs/two/fusion/seed0"
    out = cli(grid["dir"], "evaluate", str(run_dir), "--split", "test", "--plots", str(tmp_path)).stdout
    for name in ("test-confusion.png", "test-reliability.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    p = Predictions.load(tmp_path / "test.npz")
    probs = softmax(p.logits)
    conf, correct = probs.max(1), probs.argmax(1) == p.labels
    ece = sum(abs(correct[m].mean() - conf[m].mean()) * m.sum() / len(conf)
              for lo in np.arange(15) / 15 if (m := (conf > lo) & (conf <= lo + 1 / 15)).any())
    assert f"ECE {ece:.4f}" in out
    exp = load_experiment(grid["two"])
    (chart,) = experiment_bar_charts(exp, collect(exp), tmp_path / "bars")
    with Image.open(chart) as im:
        assert chart.name == "tiny-scenes.png" and im.format == "PNG"


def test_finished_runs_without_predictions_get_them_from_their_saved_model(grid):
    run_dir = grid["dir"] / "runs/two/text/seed1"
    before = {s: np.load(run_dir / "predictions" / f"{s}.npz")["logits"] for s in ("dev", "test")}
    for s in ("dev", "test"):
        (run_dir / "predictions" / f"{s}.npz").unlink()
    out = run(grid["two"], lanes=1)
    assert "4 finished, 0 to run, 1 to fill in predictions" in out and "predictions from the saved model" in out
    for s in ("dev", "test"):
        np.testing.assert_allclose(np.load(run_dir / "predictions" / f"{s}.npz")["logits"], before[s], atol=1e-5)


def test_runs_side_by_side_wait_for_one_cache_builder(tmp_path):
    import threading

    from mmsenti.train.cache import _build_lock

    entered = threading.Event()

    def second():
        with _build_lock(tmp_path / "entry"):
            entered.set()

    with _build_lock(tmp_path / "entry"):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.3)  # blocked while the first builder holds the entry
    assert entered.wait(5)
    t.join()


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, T, Z, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _gone(pid: int) -> bool:
    return _state(pid) in (None, "Z")  # a zombie has ended; only its exit status waits to be collected


def _poll(predicate, timeout: float):
    """``predicate()`` once it is true, polled every few milliseconds; its last value after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_killing_the_runner_ends_its_runs_and_a_rerun_completes_them(tmp_path):
    import signal

    path = experiment_file(tmp_path, "k", "runs/k", sets=[*TINY, "optim.epochs=3"])
    exp = load_experiment(path)
    job = Job(exp, exp.row("fusion"), 0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    runner = subprocess.Popen([sys.executable, "-m", "mmsenti", "experiment", "run", path.name, "--only", "fusion",
                               "--seeds", "0", "--threads", "1"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def training() -> int | None:
        """The pid of the run once it holds its run directory (its lock records the holder)."""
        try:
            pid = json.loads((job.run_dir / "run.lock").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None
        return None if _gone(pid) else pid

    pid = None
    try:
        pid = _poll(training, timeout=300)
        assert pid, "the run never started"
        os.kill(pid, signal.SIGSTOP)  # hold it mid-run, so that it cannot finish before its runner is killed
        assert not job.finished, "the run finished before it could be held: give it more epochs"
        runner.kill()
        runner.wait()
        os.kill(pid, signal.SIGCONT)
        assert _poll(lambda: _gone(pid), timeout=60), f"run {pid} outlived its runner"
        assert not job.finished  # it ended with its runner, not trained on to the end as an orphan
    finally:
        runner.kill()
        runner.wait()
        if pid and not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    out = run(path, only=["fusion"], seeds=[0])
    assert "1 runs: 0 finished, 1 to run" in out and "FAILED" not in out
    assert job.finished


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_lifeline_without_the_kernel_tie_stops_the_command_when_its_parent_is_gone():
    """The fallback of platforms without PR_SET_PDEATHSIG: lifeline.watch stays between parent and command."""
    import signal

    import mmsenti.experiment.lifeline as lifeline

    watcher = (f"import sys; sys.path.insert(0, {str(Path(lifeline.__file__).parent)!r}); import lifeline; "
               f"lifeline.watch(int(sys.argv[1]), [sys.executable, '-c', 'import time; time.sleep(600)'])")
    parent = (f"import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-I', '-S', '-c', {watcher!r}, "
              f"str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    # the parent ends at once, leaving the watcher and its command behind
    middle = int(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout)

    def command() -> int | None:
        try:
            return int(Path(f"/proc/{middle}/task/{middle}/children").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    sleeper = _poll(command, timeout=60)
    try:
        assert sleeper, "the watcher did not start its command"
        assert _poll(lambda: _gone(sleeper) and _gone(middle), timeout=60), "the command outlived its parent"
    finally:
        for pid in (sleeper, middle):
            if pid and not _gone(pid):
                os.kill(pid, signal.SIGKILL)
