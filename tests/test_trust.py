"""Files mmsenti does not control: crafted checkpoints, two writers on one run folder, damaged model folders."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny

from mmsenti.config import load_config
from mmsenti.data.base import DataError
from mmsenti.data.scenes import ScenesConfig, build_scenes, make_sample
from mmsenti.models.folder import MANIFEST, ModelFileError, ModelFolder
from mmsenti.train.checkpoint import CheckpointError, atomic_save, load_checkpoint
from mmsenti.train.lock import LOCK_FILE, RunDirLock, RunDirLocked, check_run_dir_free, hold_run_dir
from mmsenti.utils import rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmsenti", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=ENV)


def tiny_sets() -> list[str]:
    from conftest import TINY

    return [a for o in TINY for a in ("--set", o)]


class _Payload:
    """Unpickling this creates ``marker``: what a crafted run folder would do with a shell command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (shutil.copyfile, (__file__, self.marker))


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    payload = {"model": {"w": torch.zeros(2)}, "rng": _Payload(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=r"refused to load checkpoint .*last\.pt.*could run code") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    if container == "torch.save":
        assert "shutil.copyfile" in str(e.value)  # names what the file references, read without running it
    assert not marker.exists()
    # The full unpickler (the old loader) would have run it: the payload is real.
    if container == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_resume_from_a_crafted_run_folder_is_a_one_line_error(tmp_path, tiny_overrides):
    """A run folder as shared with a paper: its config.json is fine, its last.pt carries a payload."""
    from mmsenti.config import save_config

    run = tmp_path / "shared_run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(load_config(ROOT / "configs" / "quickstart.yaml", tiny_overrides), run / "config.json")
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "state": {"epoch": 1, "note": _Payload(marker)}}, run / "checkpoints" / "last.pt")
    r = run_cli("train", "--out", str(run), "--resume")
    assert r.returncode == 2 and not marker.exists()
    assert r.stderr.strip().splitlines()[-1].startswith("mmsenti: error: refused to load checkpoint")
    assert "Traceback" not in r.stderr
    assert "refused to load checkpoint" in (run / "train.log").read_text()  # the run folder keeps the evidence


def test_rng_state_is_plain_and_restores_every_generator():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    tensors_and_plain = (torch.Tensor, int, float, str, type(None))
    flat = [v for part in state.values() for v in (part.values() if isinstance(part, dict) else [part])]
    assert all(isinstance(v, tensors_and_plain) for v in flat)
    draws = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == draws


def test_checkpoint_of_an_older_mmsenti_is_converted(tmp_path):
    """0.1 stored numpy's RNG state as an array: read with exactly numpy's array types allowed, then converted."""
    np.random.seed(5)
    random.seed(6)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    atomic_save({"model": {"w": torch.ones(2)}, "rng": old}, tmp_path / "old.pt")
    expected = (random.random(), np.random.random())
    random.seed(0)
    np.random.seed(0)
    ckpt = load_checkpoint(tmp_path / "old.pt")
    set_rng_state(ckpt["rng"])
    assert (random.random(), np.random.random()) == expected


def _flip_inside_a_tensor(path: Path) -> None:
    """Flip one bit in the middle of the data of the checkpoint's largest tensor (the zip stores it uncompressed)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26: entry.header_offset + 30])
    data[entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_tensor_stops_the_resume_naming_the_file(tmp_path, tiny_overrides):
    from mmsenti.train.trainer import Trainer, TrainingInterrupted

    run = tmp_path / "run"
    trainer = Trainer(load_config(ROOT / "configs" / "quickstart.yaml", tiny_overrides + ["run.checkpoint_every=2"]),
                      run)
    trainer.interrupt_after_step = 3
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    last = run / "checkpoints" / "last.pt"
    manifest = json.loads((run / "checkpoints" / "manifest.json").read_text())["files"]
    assert set(manifest) == {"last.pt"} and manifest["last.pt"]["size"] == last.stat().st_size
    before = torch.load(last, weights_only=True)["model"]
    _flip_inside_a_tensor(last)
    after = torch.load(last, weights_only=True)["model"]  # torch reads it without a word (zip CRCs unchecked) ...
    assert any(not torch.equal(before[k], after[k]) for k in before)  # ... with other weights
    r = run_cli("train", "--out", str(run), "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mmsenti: error: {last}: SHA-256 ") and "the file is damaged or was modified" in line
    assert load_checkpoint(last, verify=False)["state"]["step"] == 2  # the same file, read unverified, on request


def test_a_checkpoint_verifies_whenever_its_write_was_killed(tmp_path, monkeypatch):
    """The manifest lists the new file's checksum beside the old one's while the file is renamed into place: a
    kill before the rename leaves the old file, a kill after it the new one, and either verifies."""
    from mmsenti.train import checkpoint as ckpt

    path = tmp_path / "last.pt"
    atomic_save({"w": torch.zeros(100)}, path, checksum=True)
    replace = os.replace

    def killed_at_the_rename(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": torch.ones(100)}, path, checksum=True)
    assert torch.equal(load_checkpoint(path)["w"], torch.zeros(100))  # the old file, verified
    monkeypatch.setattr(ckpt.os, "replace", replace)
    record = ckpt._record

    def killed_after_the_rename(p, rec, pending=False):
        if not pending:
            raise KeyboardInterrupt
        record(p, rec, pending)

    monkeypatch.setattr(ckpt, "_record", killed_after_the_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": torch.full((100,), 2.0)}, path, checksum=True)
    assert torch.equal(load_checkpoint(path)["w"], torch.full((100,), 2.0))  # the new file, verified
    monkeypatch.setattr(ckpt, "_record", record)
    atomic_save({"w": torch.full((100,), 3.0)}, path, checksum=True)
    assert "pending" not in json.loads((tmp_path / "manifest.json").read_text())["files"]["last.pt"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"last\.pt: \d+ bytes, but \d+ when it was written"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------ run-dir lock
def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    with hold_run_dir(tmp_path / "run") as lock:
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunDirLocked, match=rf"in use by another mmsenti run \(pid {os.getpid()} on host "):
            RunDirLock(tmp_path / "run").acquire()
        with pytest.raises(RunDirLocked):
            check_run_dir_free(tmp_path / "run")
        assert lock.held
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""  # a clean release empties the record
    check_run_dir_free(tmp_path / "run")
    with hold_run_dir(tmp_path / "run"):
        pass


_HOLD = """
import sys, time
from mmsenti.train.lock import hold_run_dir
with hold_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=rf"pid {proc.pid} on host {socket.gethostname()}"):
            RunDirLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with caplog.at_level("INFO", logger="mmsenti.train.lock"), hold_run_dir(tmp_path):  # the kernel released it
        pass
    assert f"taking over the lock of a run that ended without releasing it (pid {proc.pid}" in caplog.text


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not (path.is_file() and path.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.slow
def test_two_trainers_on_one_folder_and_resume_after_kill9(tmp_path):
    """A second `train --out SAME` is refused while the first runs (which finishes unharmed); a run killed with
    SIGKILL leaves a lock the kernel has released, and `--resume` ends byte-identical to an uninterrupted run."""
    sets = tiny_sets() + ["--set", "optim.epochs=2", "--set", "run.checkpoint_every=2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    first = subprocess.Popen([sys.executable, "-m", "mmsenti", "train", "--config", "configs/quickstart.yaml", *sets,
                              "--out", str(full)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    _wait_for(full / LOCK_FILE, first)
    second = run_cli("train", "--config", "configs/quickstart.yaml", *sets, "--set", "run.seed=7", "--out", str(full))
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mmsenti: error: {full} is in use by another mmsenti run (pid {first.pid} on host "
                           f"{socket.gethostname()}")
    assert json.loads((full / "config.json").read_text())["run"]["seed"] == 0  # untouched by the refused run
    assert (full / "train.log").read_text().count("trainable parameters") == 1  # one run wrote the log

    victim = subprocess.Popen([sys.executable, "-m", "mmsenti", "train", "--config", "configs/quickstart.yaml",
                               *sets, "--out", str(cut)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    _wait_for(cut / "checkpoints" / "last.pt", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    r = run_cli("train", "--out", str(cut), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cut / "metrics.json").read_bytes() == (full / "metrics.json").read_bytes()


# ------------------------------------------------------------------------------------------------ model folders
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    scenes = build_scenes(ScenesConfig(num_train=24, num_dev=4, num_test=4, image_size=32))
    cfg, model, processor = build_tiny("late-fusion", scenes, "model.hidden=16")
    directory = tmp_path_factory.mktemp("model")
    ModelFolder.save(directory, model, processor, cfg)
    return directory


def _copy(src: Path, dst: Path, manifest: bool) -> Path:
    shutil.copytree(src, dst)
    if not manifest:
        (dst / MANIFEST).unlink()
    return dst


def _truncate(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(d: Path) -> None:
    p = d / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-100] ^= 0x40  # inside the last tensor's data: the header still parses
    p.write_bytes(bytes(data))


def _break_config(d: Path) -> None:
    (d / "config.json").write_text((d / "config.json").read_text()[:-30])


def _drop_task(d: Path) -> None:
    labels = json.loads((d / "labels.json").read_text())
    del labels["task"]
    (d / "labels.json").write_text(json.dumps(labels))


def _drop_tokenizer(d: Path) -> None:
    shutil.rmtree(d / "tokenizer")


DAMAGE = {  # case → (damage, error with the manifest, error without it)
    "truncated weights": (_truncate, r"model\.safetensors: \d+ bytes, but \d+ when the model was saved",
                          r"model\.safetensors: not a readable safetensors file"),
    "broken config.json": (_break_config, r"config\.json: \d+ bytes, but \d+ when the model was saved",
                           r"config\.json:\d+:\d+: invalid JSON"),
    "labels.json without task": (_drop_task, r"labels\.json: \d+ bytes, but \d+ when the model was saved",
                                 r"labels\.json: 'task' must be classification or regression, got None"),
    "missing tokenizer/": (_drop_tokenizer, r"tokenizer/\S+: missing \(listed in manifest\.json",
                           r"tokenizer/: missing \(this model reads text"),
    "flipped weight bytes": (_flip, r"model\.safetensors: SHA-256 \w+… differs .* damaged or was modified", None),
}


def test_intact_folder_has_a_manifest_and_loads(saved_model):
    manifest = json.loads((saved_model / MANIFEST).read_text())
    assert {"model.safetensors", "config.json", "labels.json", "preprocessing.json"} <= set(manifest["files"])
    assert any(name.startswith("tokenizer/") for name in manifest["files"])
    folder = ModelFolder.open(saved_model)
    model = folder.load_model()
    assert model.info.label_names == ["negative", "neutral", "positive"]


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_model_folder_is_a_clear_error(saved_model, tmp_path, case, manifest):
    damage, with_manifest, without = DAMAGE[case]
    d = _copy(saved_model, tmp_path / "m", manifest)
    damage(d)
    if not manifest and without is None:  # nothing to check against: this is what the manifest is for
        ModelFolder.open(d).load_model()
        return
    with pytest.raises(ModelFileError, match=with_manifest if manifest else without) as e:
        ModelFolder.open(d).load_model()
    assert isinstance(e.value, DataError) and "\n" not in str(e.value) and str(d) in str(e.value)


@pytest.mark.parametrize("case", ["truncated weights", "flipped weight bytes", "missing tokenizer/"])
def test_damaged_model_folder_on_the_command_line(saved_model, tmp_path, case):
    d = _copy(saved_model, tmp_path / "m", manifest=True)
    DAMAGE[case][0](d)
    make_sample(0, "test", seed=0).image.save(tmp_path / "img.png")
    r = run_cli("predict", str(d), "--text", "sunny please", "--image", str(tmp_path / "img.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("mmsenti: error: ") and len(r.stderr.strip().splitlines()) == 1
