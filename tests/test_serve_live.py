"""``mmsenti serve`` as a user runs it: a real uvicorn process on 127.0.0.1, and the web page in headless Chromium.

The browser test needs Debian's ``chromium`` + ``chromium-driver`` and selenium (``make test`` installs them when
it can) and skips cleanly without them.
"""

from __future__ import annotations

import base64
import io

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from serving_fixtures import browser, save_tiny_model, serving, submit_post  # noqa: E402

from mmsenti.data.scenes import make_sample  # noqa: E402
from mmsenti.inference import load_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir):
    with serving(model_dir) as url:
        yield url


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


@pytest.mark.browser
def test_web_page_shows_the_predictors_label(server, model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        ref_model = load_model(model_dir)
        for i in (4, 9):
            s = make_sample(i, "test", seed=12, image_size=64)
            path = tmp_path / f"post{i}.png"
            s.image.save(path)
            submit_post(driver, server, s.text, path)
            label = WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.ID, "label")))
            ref = ref_model.predict(s.text, image=str(path))
            assert label.text == ref["label"]
            bars = driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar")
            assert [b.get_attribute("data-label") for b in bars] == list(ref["probabilities"])
    finally:
        driver.quit()
