"""Trainer: checkpoints, exact resume, parameter groups, schedules."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmsenti.cli import main
from mmsenti.config import OptimConfig, load_config
from mmsenti.train.checkpoint import atomic_save, load_checkpoint
from mmsenti.train.optim import build_optimizer, lr_lambda, param_groups
from mmsenti.train.trainer import EpochBatchSampler, Trainer, TrainingInterrupted


def _train(run_dir, overrides, interrupt=None, resume=False):
    trainer = Trainer(None if resume else load_config(None, overrides), run_dir, resume=resume)
    trainer.interrupt_after_step = interrupt
    return trainer.fit()


def test_run_directory_contents(tmp_path, tiny_overrides):
    results = _train(tmp_path, tiny_overrides)
    assert set(results) == {"dev", "test"}
    for key in ("accuracy", "f1_weighted", "f1_macro", "confusion_matrix", "per_class"):
        assert key in results["test"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == results
    for name in ("config.json", "run_info.json", "metrics.csv", "train.log", "checkpoints/last.pt",
                 "checkpoints/best.pt", "model/model.safetensors", "model/config.json", "model/tokenizer"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and "dev_f1_weighted" in rows[0]  # header + one row per epoch
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert "git_revision" in info
    log = (tmp_path / "train.log").read_text()
    assert "loss_sc" in log  # every loss term is logged by name


@pytest.mark.parametrize("interrupt", [3, 9])  # mid-epoch 1 and mid-epoch 2 (6 batches per epoch)
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_overrides, interrupt):
    overrides = tiny_overrides + ["optim.epochs=2", "run.checkpoint_every=2", "run.log_every=1"]
    full = _train(tmp_path / "full", overrides)
    with pytest.raises(TrainingInterrupted):
        _train(tmp_path / "cut", overrides, interrupt=interrupt)
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["state"]
    assert 0 < state["step"] <= interrupt and state["step"] % 2 == 0
    resumed = _train(tmp_path / "cut", overrides, resume=True)
    assert resumed == full
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    csv_rows = (tmp_path / "cut" / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3
    # The resumed epoch's train loss is the mean over all its batches (the checkpoint carries the partial sums),
    # not over the batches after the resume: metrics.csv is the uninterrupted run's, byte for byte.
    assert (tmp_path / "cut" / "metrics.csv").read_text() == (tmp_path / "full" / "metrics.csv").read_text()


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"x": torch.arange(3)}, path)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        atomic_save({"x": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp files left


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    from mmsenti.data.base import DataError

    path = tmp_path / "last.pt"
    atomic_save({"x": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_epoch_batches_depend_only_on_seed_and_epoch():
    a = EpochBatchSampler(50, 8, seed=1, epoch=2).batches()
    assert a == EpochBatchSampler(50, 8, seed=1, epoch=2).batches()
    assert a != EpochBatchSampler(50, 8, seed=1, epoch=3).batches()
    assert list(EpochBatchSampler(50, 8, seed=1, epoch=2, start=3)) == a[3:]
    assert sorted(i for b in a for i in b) == list(range(50))


def test_param_groups_by_name():
    class M(torch.nn.Module):
        backbone_prefixes = ("enc.",)

        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            self.head = torch.nn.Linear(4, 2)
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4, 4))
            self.frozen = torch.nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

        def no_weight_decay(self):
            return {"cls_token"}

    groups = {g["group"]: g for g in param_groups(M(), OptimConfig(lr=1e-3, backbone_lr=1e-5, weight_decay=0.1))}
    assert groups["backbone"]["names"] == ["enc.0.weight"] and groups["backbone"]["lr"] == 1e-5
    assert set(groups["backbone/no_decay"]["names"]) == {"enc.0.bias", "enc.1.weight", "enc.1.bias"}
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0
    assert groups["new"]["names"] == ["head.weight"] and groups["new"]["weight_decay"] == 0.1
    assert set(groups["new/no_decay"]["names"]) == {"head.bias", "cls_token"}
    assert not any("frozen" in n for g in groups.values() for n in g["names"])
    opt = build_optimizer(M(), OptimConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == 7


def test_schedules_warm_up_then_decay():
    f = lr_lambda(OptimConfig(warmup_ratio=0.1, schedule="linear"), total_steps=100)
    assert f(0) < f(5) < f(9) <= 1.0 and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == 0.0
    c = lr_lambda(OptimConfig(warmup_ratio=0.0, schedule="cosine"), total_steps=100)
    assert c(0) == pytest.approx(1.0) and c(50) == pytest.approx(0.5) and c(100) == pytest.approx(0.0)


def test_gradient_accumulation_matches_a_big_batch():
    """Two micro-batches of 8 with grad_accum=2 give the gradient of one batch of 16 (no batch norm here)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for sl in (slice(0, 8), slice(8, 16)):
        (torch.nn.functional.cross_entropy(model(x[sl]), y[sl]) / 2).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(big, model.parameters(), strict=True))


# ------------------------------------------------------------------------------------------ resume with --set
def _error(capsys) -> str:
    """The CLI's error line (the log shares stderr): one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _jsonl_data(path, n=48):
    """A text-only JSON-lines dataset (train/dev/test), so the run has a data.root that can move."""
    words = "good bad film actor plot scene music ending story cast".split()
    rows = [{"id": f"s{i}", "text": " ".join(words[(i * 3 + j) % len(words)] for j in range(2 + i % 5)),
             "label": ["neg", "pos"][i % 2], "split": "train" if i < n - 16 else ("dev" if i % 2 else "test")}
            for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _jsonl_overrides(tiny, data):
    tiny = [o for o in tiny if not o.startswith("data.num_")]
    return tiny + ["model.name=text-only-tiny", "data.name=jsonl", f"data.root={data}",
                   "data.batch_size=8", "run.checkpoint_every=2", "optim.epochs=2"]


def test_resume_accepts_a_moved_data_root_and_refuses_a_change_of_the_training(tmp_path, tiny_overrides, capsys):
    data = _jsonl_data(tmp_path / "a" / "data.jsonl")
    overrides = _jsonl_overrides(tiny_overrides, data)
    full = _train(tmp_path / "full", overrides)
    run = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted):
        _train(run, overrides, interrupt=3)
    moved = tmp_path / "b" / "data.jsonl"
    moved.parent.mkdir()
    shutil.move(data, moved)
    resume = ["train", "--out", str(run), "--resume", "--quiet"]
    # The data moved: resuming as before says how to point the run at it.
    assert main(resume) == 2
    err = _error(capsys)
    assert err.startswith("mmsenti: error: cannot resume") and err.endswith("plus --set data.root=DIR")
    # A change of what the run computes is refused, naming the setting (and nothing runs).
    assert main(resume + ["--set", f"data.root={moved}", "--set", "optim.lr=0.5"]) == 2
    err = _error(capsys)
    assert err.startswith("mmsenti: error: --resume cannot change optim.lr (0.001 in the run, 0.5 asked)")
    assert "may change only data.root, data.missing_images" in err
    assert "resumes" not in json.loads((run / "run_info.json").read_text())
    # --set data.root=NEW: accepted, recorded, and the run ends as the uninterrupted one did.
    assert main(resume + ["--set", f"data.root={moved}"]) == 0
    assert json.loads((run / "metrics.json").read_text()) == full
    info = json.loads((run / "run_info.json").read_text())
    assert info["resumes"][-1]["changes"] == {"data.root": [str(data), str(moved)]}
    assert f"resuming with data.root = '{moved}' (the run started with '{data}')" in (run / "train.log").read_text()
    assert json.loads((run / "config.json").read_text())["data"]["root"] == str(data)  # the config it started with
    assert json.loads((run / "model" / "config.json").read_text())["data"]["root"] == str(moved)


def test_evaluate_of_a_run_whose_data_moved_says_how_to_point_at_it(tmp_path, tiny_overrides, capsys):
    data = _jsonl_data(tmp_path / "a" / "data.jsonl")
    run = tmp_path / "run"
    _train(run, _jsonl_overrides(tiny_overrides, data) + ["optim.epochs=1"])
    moved = tmp_path / "b"
    shutil.move(data.parent, moved)
    assert main(["evaluate", str(run)]) == 2
    err = _error(capsys)
    assert err.startswith(f"mmsenti: error: {run}: the data it was trained on is not at data.root {data}")
    assert err.endswith("give the data's directory with --root DIR")
    assert main(["evaluate", str(run), "--root", str(moved / "data.jsonl")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_fp16_on_cpu_is_an_error_not_fp32(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--set", "run.device=cpu", "--set", "run.precision=fp16",
                 "--quiet"]) == 2
    assert _error(capsys).startswith("mmsenti: error: run.precision=fp16: fp16 autocast runs on CUDA only")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
