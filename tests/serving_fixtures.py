"""Saved models and post files for the prediction and serving tests (untrained tiny models: parity needs no skill)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mmsenti.config import load_config
from mmsenti.data.scenes import ScenesConfig, build_scenes, make_sample
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import build_processor
from mmsenti.models.folder import ModelFolder

TINY_MODEL = ["model.name=late-fusion-tiny", "data.num_train=48"]
TINY_INFIG = ["model.name=infig-tiny", "model.modality_dropout=0.3"]
# Its answer for a post depends on the post's batch-mates: every per-post command refuses it.
TINY_RAHP_IN_BATCH = ["model.name=rahp-tiny", "model.retrieval=in-batch"]


def save_tiny_model(directory: Path, overrides=(), seed: int = 0) -> Path:
    """A randomly initialised tiny model saved as ``mmsenti.load_model`` reads it (late fusion by default)."""
    cfg = load_config(None, TINY_MODEL + list(overrides))
    data = build_scenes(ScenesConfig(num_train=48, num_dev=0, num_test=0, image_size=32))
    processor = build_processor(cfg.model, [s.text for s in data.splits["train"]], data.task)
    torch.manual_seed(seed)
    model = build_model(cfg.model, TaskInfo(data.task, data.label_names), processor).eval()
    ModelFolder.save(directory, model, processor, cfg)
    return directory


def write_posts(directory: Path, n: int, split: str = "test", name: str = "posts.jsonl") -> tuple[Path, list]:
    """``n`` generated scenes posts as a JSON-lines file with their images beside it; returns (file, samples)."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = [make_sample(i, split, seed=7, image_size=48) for i in range(n)]
    with open(directory / name, "w") as f:
        for s in samples:
            s.image.save(directory / f"{s.id}.png")
            f.write(json.dumps({"id": s.id, "text": s.text, "image": f"{s.id}.png"}) + "\n")
    return directory / name, samples


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: Path, *args: str, timeout: float = 120):
    """``mmsenti serve MODEL_DIR`` in its own process on a free port; yields its URL once /readyz answers 200."""
    httpx = pytest.importorskip("httpx")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmsenti", "serve", str(model_dir), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mmsenti serve exited: {proc.stderr.read()[-2000:]}")
            if time.time() > deadline:
                raise AssertionError("mmsenti serve did not become ready")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def browser():
    """Headless Chromium under selenium; skips without Debian's chromium + chromium-driver."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium + chromedriver (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)


def submit_post(driver, url: str, text: str, image: Path, explain: bool = False) -> None:
    """Fill in the served web page's form as a user does (text, image file, optionally Explain) and submit it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, 30).until(ec.text_to_be_present_in_element((By.ID, "model-summary"), "reads"))
    driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.ID, "image").send_keys(str(image))
    if explain:
        driver.find_element(By.ID, "explain").click()
    driver.find_element(By.ID, "submit").click()
