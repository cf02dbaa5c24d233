"""scripts/results.py: the published tables are computed from the runs' metrics.json and written between markers."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest
from conftest import ROOT


@pytest.fixture
def results(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "run_dir", lambda row, seed: tmp_path / "runs" / row / f"seed{seed}")
    return mod


def _finish(mod, row: str, seed: int, test: dict) -> None:
    out = mod.run_dir(row, seed)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"dev": {}, "test": test}))


def test_tables_report_mean_and_sample_std_of_finished_seeds(results):
    f1 = [0.61, 0.65, 0.70]
    for seed, v in enumerate(f1):
        _finish(results, "cm-memes-text", seed, {"accuracy": v + .01, "f1_weighted": v, "f1_macro": v - .1})
    for seed, (mae, corr) in enumerate([(0.8, 0.7), (0.9, 0.6)]):
        _finish(results, "mosi-rahp", seed, {"mae": mae, "corr": corr})
    text = results.tables(results.ROWS, [0, 1, 2])
    row = next(line for line in text.splitlines() if line.startswith("| text only"))
    assert f"| 3 | {statistics.fmean(f1) + .01:.4f} ± {statistics.stdev(f1):.4f} |" in row
    assert f"{statistics.fmean(f1):.4f} ± {statistics.stdev(f1):.4f}" in row
    assert "### CMU-MOSI" in text and "### HFM" not in text  # groups without runs are left out
    assert "| *reference:* frozen MiniLM text + LR |" in text  # the reference rows sit in their group's table
    mosi = next(line for line in text.splitlines() if line.startswith("| rahp, text"))
    assert "| 2 | 0.8500 ± 0.0707 | 0.6500 ± 0.0707 |" in mosi
    # the metrics a run lacks are shown as "–" rather than failing
    assert mosi.count("| – ") == len(results.REGRESSION) - 2

    head = results.headline([0, 1, 2])
    assert f"| cm_memes (text only) | INFIG-lite | 3 | {statistics.fmean(f1):.4f} ±" in head
    assert "| CMU-MOSI (text only) | rahp (memory bank) | 2 | 0.8500 ± 0.0707 | 0.6500 ± 0.0707 |" in head
    assert "MVSA-Single" not in head


def test_replace_block_keeps_the_text_around_the_markers(results, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{results.BEGIN}\nold table\n{results.END}\noutro\n")
    results.replace_block(doc, results.BEGIN, results.END, "| a |\n|---|\n| 1 |\n")
    assert doc.read_text() == f"intro\n{results.BEGIN}\n| a |\n|---|\n| 1 |\n\n{results.END}\noutro\n"
    doc.write_text(f"intro\n{results.END}\n{results.BEGIN}\n")
    with pytest.raises(SystemExit, match="doc.md"):
        results.replace_block(doc, results.BEGIN, results.END, "x")


def test_the_documents_have_their_markers():
    for path, (begin, end) in [("docs/results.md", ("<!-- tables:", "<!-- end tables -->")),
                               ("README.md", ("<!-- headline:", "<!-- end headline -->"))]:
        text = (ROOT / path).read_text()
        assert text.count(begin) == 1 and text.index(begin) < text.index(end), path
