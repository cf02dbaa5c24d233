"""``mmsenti serve`` as a user runs it: a real uvicorn process on 127.0.0.1, and the web page in headless Chromium.

The browser test needs Debian's ``chromium`` + ``chromium-driver`` and selenium (``make test`` installs them when
it can) and skips cleanly without them.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from serving_fixtures import save_tiny_model  # noqa: E402

from mmsenti.data.scenes import make_sample  # noqa: E402
from mmsenti.inference import load_model  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmsenti", "serve", str(model_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mmsenti serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError("mmsenti serve did not become ready")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_served_answer_equals_the_predictor(server, model_dir, tmp_path):
    s = make_sample(11, "test", seed=2, image_size=48)
    buf = io.BytesIO()
    s.image.save(buf, format="PNG")
    r = httpx.post(f"{server}/v1/predict", json={"text": s.text, "image": base64.b64encode(buf.getvalue()).decode()},
                   timeout=30)
    assert r.status_code == 200, r.text
    ref = load_model(model_dir).predict(s.text, image=s.image)
    row = r.json()["predictions"][0]
    assert row["label"] == ref["label"]
    assert row["probabilities"] == pytest.approx(ref["probabilities"], abs=2e-6)


def test_serve_command_errors_are_one_line(tmp_path, model_dir, capsys):
    from mmsenti.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    assert "not a trained mmsenti model" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--allow-missing-modality"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmsenti: error: --allow-missing-modality") and "Traceback" not in err
    assert main(["serve", str(model_dir), "--max-posts", "0"]) == 2
    assert "max_posts must be >= 1" in capsys.readouterr().err


def _browser():
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


@pytest.mark.browser
def test_web_page_shows_the_predictors_label(server, model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        ref_model = load_model(model_dir)
        for i in (4, 9):
            s = make_sample(i, "test", seed=12, image_size=64)
            path = tmp_path / f"post{i}.png"
            s.image.save(path)
            driver.get(server + "/")
            WebDriverWait(driver, 30).until(ec.text_to_be_present_in_element((By.ID, "model-summary"), "reads"))
            driver.find_element(By.ID, "text").send_keys(s.text)
            driver.find_element(By.ID, "image").send_keys(str(path))
            driver.find_element(By.ID, "submit").click()
            label = WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.ID, "label")))
            ref = ref_model.predict(s.text, image=str(path))
            assert label.text == ref["label"]
            bars = driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar")
            assert [b.get_attribute("data-label") for b in bars] == list(ref["probabilities"])
    finally:
        driver.quit()
