"""End to end through the command line: train on a tiny scenes set, evaluate, predict, list."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mmsenti.data.scenes import make_sample


def run_cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "mmsenti", *args], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"mmsenti {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import TINY

    run = tmp_path_factory.mktemp("run")
    sets = [a for o in TINY for a in ("--set", o)]
    run_cli("train", "--config", "configs/quickstart.yaml", *sets, "--out", str(run))
    return run


def test_train_writes_metrics_and_model(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert set(metrics) == {"dev", "test"}
    cm = torch.tensor(metrics["test"]["confusion_matrix"])  # the reported accuracy is that of the confusion matrix
    assert cm.sum() > 0 and abs(metrics["test"]["accuracy"] - cm.trace().item() / cm.sum().item()) < 1e-9
    assert (trained / "model" / "model.safetensors").is_file()


def test_evaluate_reproduces_the_training_run_test_metrics(trained, tmp_path):
    out = tmp_path / "eval.json"
    r = run_cli("evaluate", str(trained), "--split", "dev", "test", "--output", str(out))
    assert "accuracy" in r.stdout
    got = json.loads(out.read_text())
    ref = json.loads((trained / "metrics.json").read_text())
    for split in ("dev", "test"):
        assert got[split]["accuracy"] == ref[split]["accuracy"]
        assert got[split]["f1_weighted"] == pytest.approx(ref[split]["f1_weighted"])


def test_predict_single_and_file(trained, tmp_path):
    s = make_sample(0, "test", seed=0)
    s.image.save(tmp_path / "img.png")
    r = run_cli("predict", str(trained), "--text", s.text, "--image", str(tmp_path / "img.png"))
    row = json.loads(r.stdout)
    assert row["label"] in ("negative", "neutral", "positive")
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    # The same post through the Python API gives the same answer.
    import mmsenti

    model = mmsenti.load_model(trained)
    assert model.predict(s.text, image=str(tmp_path / "img.png"))["label"] == row["label"]

    lines = [{"id": "a", "text": s.text, "image": "img.png"}, {"id": "b", "text": "fine", "image": "img.png"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_cli("predict", str(trained), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", "b"] and out[0]["label"] == row["label"]


def test_predict_errors_are_clear(trained, tmp_path, capsys):
    """One line and exit code 2 each (in this process: the same ``main`` a console script runs, without four
    interpreter start-ups)."""
    from mmsenti.cli import main

    def run(*args: str) -> str:
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmsenti: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "give --image" in run("predict", str(trained), "--text", "hi")
    assert "nope.png" in run("predict", str(trained), "--text", "hi", "--image", str(tmp_path / "nope.png"))
    assert "not a trained mmsenti model" in run("predict", str(tmp_path), "--text", "hi")
    # Bytes that are not UTF-8 on the command line reach Python as lone surrogates, which crashed the tokenizer.
    make_sample(0, "test", seed=0).image.save(tmp_path / "img.png")
    err = run("predict", str(trained), "--text", "caf\udce9", "--image", str(tmp_path / "img.png"))
    assert err == "mmsenti: error: --text holds an unpaired UTF-16 surrogate (U+DCE9) at character 3: is the shell's " \
                  "encoding UTF-8?\n"


def test_resume_refuses_to_overwrite_and_list_works(trained):
    r = run_cli("train", "--out", str(trained), check=False)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli("list", "models")
    assert "late-fusion" in r.stdout and "text-only" in r.stdout
