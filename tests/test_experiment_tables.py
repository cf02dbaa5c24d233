"""Experiment files and the published tables (formerly scripts/results.py): mean ± std of the finished seeds,
reference rows, headline rows, marker blocks in docs/results.md and README.md, one-line errors and refusals."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
from conftest import ROOT

from mmsenti.config import ConfigError
from mmsenti.experiment import load_experiment
from mmsenti.experiment.jobs import Job
from mmsenti.experiment.spec import REGRESSION
from mmsenti.experiment.table import begin_marker, collect, end_marker, headline_md, replace_blocks, tables_md


@pytest.fixture
def lite(tmp_path):
    exp = load_experiment(ROOT / "experiments" / "lite.yaml")
    exp.spec.runs = str(tmp_path / "runs")
    return exp


def _finish(exp, row: str, seed: int, test: dict) -> None:
    out = Job(exp, exp.row(row), seed).run_dir
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"dev": {}, "test": test}))


def test_tables_report_mean_and_sample_std_of_finished_seeds(lite):
    f1 = [0.61, 0.65, 0.70]
    for seed, v in enumerate(f1):
        _finish(lite, "cm-memes-text", seed, {"accuracy": v + .01, "f1_weighted": v, "f1_macro": v - .1})
    for seed, (mae, corr) in enumerate([(0.8, 0.7), (0.9, 0.6)]):
        _finish(lite, "mosi-rahp", seed, {"mae": mae, "corr": corr})
    results = collect(lite)
    text = tables_md(lite, results)
    row = next(line for line in text.splitlines() if line.startswith(f"| {lite.row('cm-memes-text').name} |"))
    assert f"| 3 | {statistics.fmean(f1) + .01:.4f} ± {statistics.stdev(f1):.4f} |" in row
    assert f"{statistics.fmean(f1):.4f} ± {statistics.stdev(f1):.4f}" in row
    assert "`mmsenti train --config configs/lite/cm-memes-text.yaml --set run.seed=S`" in row
    assert "### CMU-MOSI" in text and "### HFM" not in text  # groups without runs are left out
    assert "| *reference:* frozen MiniLM text + LR |" in text  # the reference rows sit in their group's table
    assert "one modality" in text.split("### CMU-MOSI")[1]  # the group's note: what the rahp text rows are
    mosi = next(line for line in text.splitlines() if line.startswith("| rahp, text only (one modality), memory"))
    assert "| 2 | 0.8500 ± 0.0707 | 0.6500 ± 0.0707 |" in mosi
    # the metrics a run lacks are shown as "–" rather than failing
    assert mosi.count("| – ") == len(REGRESSION) - 2
    # comparisons whose runs lack per-post predictions say so instead of inventing a figure
    assert "no per-post predictions yet" not in text  # cm-memes (row B) has no runs: no comparison shown
    head = headline_md(lite, results)
    assert f"| cm_memes (text only) | fine-tuned MiniLM + INFIG fusion head | 3 | {statistics.fmean(f1):.4f} ±" in head
    assert "| MiniLM + LR .6014 |" in head  # the reference's short name and weighted F1
    assert "| CMU-MOSI (text only) | rahp, 1 modality (memory bank) | 2 | 0.8500 ± 0.0707 | 0.6500 ± 0.0707 |" in head
    assert "MVSA-Single" not in head


def test_text_only_rows_are_not_called_infig(lite):
    for row in lite.rows:
        if lite.configs[row.id].model.name == "infig" and len(lite.configs[row.id].model.modalities) == 1:
            assert "INFIG fusion head" in row.name and not row.name.startswith("INFIG"), row.id
    for h in lite.spec.headline:
        cfg = lite.configs[h.row]
        if cfg.model.name == "infig" and len(cfg.model.modalities) == 1:
            assert h.model != "INFIG-lite", h.row


def test_replace_blocks_keeps_the_text_around_the_markers(lite, tmp_path):
    begin, end = begin_marker(lite, "tables", "doc.md"), end_marker("lite", "tables")
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{begin}\nold table\n{end}\noutro\n")
    assert replace_blocks(doc, "lite", lambda name: "| a |\n|---|\n| 1 |\n") == ["tables"]
    assert doc.read_text() == f"intro\n{begin}\n| a |\n|---|\n| 1 |\n\n{end}\noutro\n"
    doc.write_text(f"intro\n{end}\n{begin}\n")
    with pytest.raises(ConfigError, match="doc.md"):
        replace_blocks(doc, "lite", lambda name: "x")
    doc.write_text("no markers\n")
    with pytest.raises(ConfigError, match="no block of experiment 'lite'"):
        replace_blocks(doc, "lite", lambda name: "x")


def test_the_documents_have_their_markers():
    for path, name, block in [("docs/results.md", "lite", "tables"), ("README.md", "lite", "headline"),
                              ("docs/results.md", "cm-memes-cv", "cv"), ("docs/results.md", "mvsa-single-cv", "cv")]:
        text = (ROOT / path).read_text()
        begin = f"<!-- begin experiment {name}: {block} "
        assert text.count(begin) == 1 and text.index(begin) < text.index(f"<!-- end experiment {name}: {block} -->")
    assert not (ROOT / "scripts" / "results.py").exists()


def test_experiment_file_errors_name_file_line_and_field(tmp_path):
    config = ROOT / "configs" / "quickstart.yaml"
    cases = [
        (f"name: x\nrows:\n  - {{id: a, config: {config}}}\n  - {{id: b, config: {config}, nmae: oops}}\n",
         r"bad.yaml:4: unknown config key 'rows\[1\].nmae'"),
        (f"name: x\nrows:\n  - {{id: a, config: {config}, set: [optim.lr=fast]}}\n",
         r"bad.yaml:3: rows\[0\] \(a\): optim.lr"),
        ("name: x\nrows:\n  - {id: a, config: nowhere.yaml}\n", r"bad.yaml:3: rows\[0\].config: file not found"),
        (f"name: x\nrows:\n  - {{id: a, config: {config}}}\ncomparisons:\n  - {{a: a, b: zz}}\n",
         r"bad.yaml:5: comparisons\[0\].b: no row 'zz'"),
        (f"name: x\nrows:\n  - {{id: a, config: {config}}}\n  - {{id: a, config: {config}}}\n", "duplicate row id"),
        ("rows: []\n", "missing 'name'"),
        ("name: x\nrows: [\n", r"bad.yaml:\d+: invalid YAML"),
    ]
    for text, message in cases:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_experiment(tmp_path / "bad.yaml")


def test_grid_rows_expand_into_one_row_per_value(tmp_path):
    (tmp_path / "g.yaml").write_text(f"""name: g
rows:
  - {{id: sweep, name: "layer {{gam_layer}}", config: {ROOT}/configs/infig/scenes.yaml,
     grid: {{model.gam_layer: [1, 3]}}}}
""")
    exp = load_experiment(tmp_path / "g.yaml")
    assert [(r.id, r.name) for r in exp.rows] == [("sweep-1", "layer 1"), ("sweep-3", "layer 3")]
    assert [exp.configs[r.id].model.gam_layer for r in exp.rows] == [1, 3]


def test_the_paper_experiment_is_refused_in_one_line_listing_what_is_missing(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMSENTI_WEIGHTS_DIR": str(tmp_path / "none"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "mmsenti", "experiment", "run", "experiments/infig-paper.yaml"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("mmsenti: error: experiments/infig-paper.yaml: 28 of 28 rows cannot run here")
    assert "Traceback" not in r.stderr
    for what in ("deberta-v3-base weights", "resnet50 weights", "clip-vit-b-32 weights"):
        assert what in err
    if (ROOT.parent / "shared" / "data" / "mvsa_single").is_dir():
        # TumEmo's train split is carved from val now (data.carve_dev); its images are still missing here.
        assert "mvsa-single images" in err and "tumemo images" in err and "tumemo train split" not in err
    else:
        assert "mvsa-single data" in err
    assert not (ROOT / "runs" / "infig-paper").exists()  # nothing was started


def test_write_refuses_to_blank_the_published_tables_without_runs(lite, tmp_path):
    from mmsenti.experiment.table import write

    doc = tmp_path / "results.md"
    doc.write_text((ROOT / "docs" / "results.md").read_text())
    with pytest.raises(ConfigError, match="no finished runs"):
        write(lite, [doc])
    assert doc.read_text() == (ROOT / "docs" / "results.md").read_text()


def test_table_refuses_runs_of_another_configuration_as_run_does(tmp_path, capsys):
    """Runs made before a row's override was edited are refused by `experiment table` (the check of `experiment
    run`), not printed under the edited command; `--write` leaves the document as it was."""
    from mmsenti.cli import main
    from mmsenti.config import load_config, save_config

    path = tmp_path / "x.yaml"
    path.write_text(f"name: x\nruns: {tmp_path / 'runs'}\nseeds: [0, 1]\nset: [optim.lr=0.001]\n"
                    f"rows:\n  - {{id: a, name: late fusion, config: {ROOT}/configs/quickstart.yaml}}\n")
    exp = load_experiment(path)
    for seed, lr in [(0, "0.001"), (1, "0.5")]:  # seed 1 was made with the row's former override
        _finish(exp, "a", seed, {"accuracy": 0.61, "f1_weighted": 0.6, "f1_macro": 0.5})
        job = Job(exp, exp.row("a"), seed)
        save_config(load_config(exp.config_path(job.row), [*job.overrides(), f"optim.lr={lr}"]),
                    job.run_dir / "config.json")
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- begin experiment x: tables -->\nold\n<!-- end experiment x: tables -->\n")
    for extra in ([], ["--write", str(doc)]):
        assert main(["experiment", "table", str(path), *extra]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("mmsenti: error: ") and err.count("\n") == 1, err
        assert f"{Job(exp, exp.row('a'), 1).run_dir} holds a run of another configuration" in err
        assert "optim.lr: 0.5 there, 0.001 here" in err
    assert "old" in doc.read_text()
    # the same runs, once the stray one is moved away, make a table
    (Job(exp, exp.row("a"), 1).run_dir / "config.json").unlink()
    (Job(exp, exp.row("a"), 1).run_dir / "metrics.json").unlink()
    assert main(["experiment", "table", str(path)]) == 0
    assert "| late fusion | 1 | 0.6100 | 0.6000 | 0.5000 |" in capsys.readouterr().out


def _block(path, name: str, block: str) -> str:
    text = (ROOT / path).read_text()
    start = text.index(f"<!-- begin experiment {name}: {block} ")
    return text[start:text.index(f"<!-- end experiment {name}: {block} -->")]


def test_the_published_blocks_hold_what_the_experiment_files_would_write():
    """The published blocks hold the files' wording (the runs to regenerate them are not in the repository, so a
    wording change is made in both); MVSA-Single keeps its dev-selected row beside the CV-selected one, and the
    CV blocks say the questions were asked after test was seen."""
    import textwrap

    lite = load_experiment(ROOT / "experiments" / "lite.yaml")
    head, tables = _block("README.md", "lite", "headline"), _block("docs/results.md", "lite", "tables")
    for h in lite.spec.headline:
        assert f"| {h.data} | {h.model} | 3 | " in head, h.row
    assert [h.row for h in lite.spec.headline][:2] == ["mvsa-single-text", "mvsa-single-text-ft4"]
    for row in lite.rows:
        assert f"| {row.name} | 3 | " in tables, row.id
    for group, note in lite.spec.notes.items():
        assert textwrap.fill(" ".join(note.split()), 116) in tables, group
    assert "reopened after test had been seen" in lite.spec.notes["MVSA-Single"]
    for name in ("cm-memes-cv", "mvsa-single-cv"):
        exp = load_experiment(ROOT / "experiments" / f"{name}.yaml")
        cv = _block("docs/results.md", name, "cv")
        for d in exp.spec.cv.decisions:
            assert "test" in d.note and f"### {d.name}\n\n{textwrap.fill(' '.join(d.note.split()), 116)}\n\n" in cv
        assert cv.count("not selected)") == {"cm-memes-cv": 4, "mvsa-single-cv": 1}[name]
    results = (ROOT / "docs" / "results.md").read_text()
    assert "not part of that choice" not in results
    assert "No test post is involved" not in (ROOT / "docs" / "experiments.md").read_text()


def test_a_run_killed_while_writing_its_config_starts_afresh(tmp_path):
    """A run killed (with its runner) while its config.json was half written has nothing to reuse: the rerun starts
    it again instead of refusing the folder; once it has a checkpoint, a damaged config.json is an error."""
    path = tmp_path / "x.yaml"
    path.write_text(f"name: x\nruns: {tmp_path / 'runs'}\nrows:\n  - {{id: a, config: {ROOT}/configs/quickstart.yaml}}\n")
    exp = load_experiment(path)
    job = Job(exp, exp.row("a"), 0)
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "config.json").write_text('{"model": {"na')
    job.check_config()
    assert "--config" in job.command()
    (job.run_dir / "checkpoints").mkdir()
    (job.run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"config.json:1:\d+: not valid JSON"):
        job.check_config()
