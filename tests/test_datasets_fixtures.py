"""Dataset readers on tiny original-format trees built in a temp dir: every rule, every error message."""

from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmsenti.data.formats  # noqa: F401  (registers the datasets)
from mmsenti.config import DataConfig, build_config
from mmsenti.data import doctor
from mmsenti.data.base import DataError, Sample
from mmsenti.data.formats.hfm import FILTER_WORDS, HFMConfig, build_hfm
from mmsenti.data.formats.images import BLANK_RGB, inspect_image
from mmsenti.data.formats.memes import MemesConfig, build_memes
from mmsenti.data.formats.mmsa import MMSAConfig, build_mmsa, convert_pickle
from mmsenti.data.formats.mvsa import MVSAConfig, MVSAMultipleConfig, build_mvsa, majority, merge_labels, merge_pair
from mmsenti.data.formats.readers import read_csv
from mmsenti.data.formats.text import normalize_tweet
from mmsenti.data.formats.tumemo import TumEmoConfig, build_tumemo
from mmsenti.data.formats.user import CsvDataConfig, UserDataConfig, build_csv, build_jsonl
from mmsenti.data.splits import carve_split, random_splits
from mmsenti.registry import DATASETS

LABEL = {"positive": 0, "neutral": 1, "negative": 2}  # MVSA label ids


def jpeg(path: Path, colour=(200, 30, 30), size=(24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


def ids(samples: list[Sample]) -> list[str]:
    return [s.id for s in samples]


# ------------------------------------------------------------------------------------------------ registry
def test_every_dataset_is_registered_with_a_typed_config():
    for name in ["mvsa-single", "mvsa-multiple", "hfm", "tumemo", "mosi", "mosei", "cm-memes", "jsonl", "csv"]:
        entry = DATASETS.get(name)
        assert issubclass(entry.config_cls, DataConfig) and entry.description
        assert entry.config_cls().name == name  # the config's default name is its registry name
    cfg = build_config({"data": {"name": "hfm", "root": "x", "format": "raw", "use_attributes": True}})
    assert isinstance(cfg.data, HFMConfig) and cfg.data.format == "raw"


def test_root_is_required_and_named(tmp_path):
    with pytest.raises(DataError, match=r"data\.root is not set"):
        build_mvsa(MVSAConfig())
    with pytest.raises(DataError, match="data.root does not exist"):
        build_hfm(HFMConfig(root=str(tmp_path / "nope")))


# ------------------------------------------------------------------------------------------------ MVSA
def test_mvsa_merge_rule_table():
    assert merge_pair("positive", "positive") == "positive"
    assert merge_pair("neutral", "negative") == "negative" and merge_pair("positive", "neutral") == "positive"
    assert merge_pair("neutral", "neutral") == "neutral"
    assert merge_pair("positive", "negative") is None and merge_pair("negative", "positive") is None
    assert majority(["negative"]) == "negative"
    assert majority(["positive", "negative", "positive"]) == "positive"
    assert majority(["positive", "negative", "neutral"]) is None
    assert merge_labels([("positive", "neutral"), ("neutral", "negative"), ("positive", "neutral")]) == ("positive", "")
    assert merge_labels([("positive", "negative"), ("neutral", "negative"), ("positive", "neutral")]) == (
        None, "positive+negative")
    no_text_majority = [("positive", "neutral"), ("neutral", "neutral"), ("negative", "neutral")]
    assert merge_labels(no_text_majority) == (None, "no majority")
    assert merge_labels([("positive", "negative")]) == (None, "positive+negative")


def _mvsa_tree(root: Path, rows: dict[str, str], header: str, with_lists: bool = True) -> None:
    (root / "data").mkdir(parents=True)
    (root / "labelResultAll.txt").write_text(header + "\n" + "".join(f"{k}\t{v}\n" for k, v in rows.items()))
    for pid in rows:
        (root / "data" / f"{pid}.txt").write_text(f"post {pid} @someone http://t.co/x\n")
        jpeg(root / "data" / f"{pid}.jpg")
    if with_lists:
        (root / "splits").mkdir()
        kept = list(rows)
        for split, part in (("train", kept[0::3]), ("dev", kept[1::3]), ("test", kept[2::3])):
            (root / "splits" / f"{split}.txt").write_text("\n".join(part) + "\n")


def test_mvsa_single_original_release(tmp_path):
    rows = {
        "1": "positive,positive",  # equal → positive
        "2": "neutral,negative",  # one neutral → negative
        "3": "positive,neutral",  # one neutral → positive
        "4": "positive,negative",  # contradictory → dropped
        "5": "negative,positive",  # contradictory → dropped
        "6": "neutral,neutral",  # equal → neutral
        "7": "negative,negative",
    }
    _mvsa_tree(tmp_path, rows, "ID\ttext,image")
    b = build_mvsa(MVSAConfig(root=str(tmp_path)))
    got = {s.id: s.label for v in b.splits.values() for s in v}
    assert got == {"1": 0, "2": 2, "3": 0, "6": 1, "7": 2}
    # The split lists name posts 4 and 5 too; they were dropped by the merge rule and are simply absent.
    assert {k: ids(v) for k, v in b.splits.items()} == {"train": ["1", "7"], "dev": ["2"], "test": ["3", "6"]}
    assert b.modalities == ("text", "image") and b.label_names == ["positive", "neutral", "negative"]
    s = b.splits["train"][0]
    assert Path(s.image).name == "1.jpg" and s.text == "post 1 @someone http://t.co/x"
    nb = build_mvsa(MVSAConfig(root=str(tmp_path), normalize_text=True))
    assert nb.splits["train"][0].text == "post 1 <user> <url>"


def test_raw_releases_honour_data_encoding(tmp_path):
    # Per-post files fall back file by file under the default (old dumps mix encodings); a named encoding is strict.
    _mvsa_tree(tmp_path, {"1": "positive,positive", "2": "negative,negative", "3": "neutral,neutral"}, "ID\ttext,image")
    (tmp_path / "data" / "2.txt").write_bytes("caf\u00e9 \u201cok\u201d".encode("cp1252"))
    (tmp_path / "data" / "3.txt").write_bytes("na\u00efve".encode("utf-8"))
    texts = {s.id: s.text for v in build_mvsa(MVSAConfig(root=str(tmp_path))).splits.values() for s in v}
    assert texts["2"] == "caf\u00e9 \u201cok\u201d" and texts["3"] == "na\u00efve"
    texts = {s.id: s.text for v in build_mvsa(MVSAConfig(root=str(tmp_path), encoding="cp1252")).splits.values()
             for s in v}
    assert texts["2"] == "caf\u00e9 \u201cok\u201d" and texts["3"] == "na\u00c3\u00afve"  # as asked: UTF-8 bytes read as cp1252
    with pytest.raises(DataError, match=r"2\.txt: not ascii text: byte 0xe9 at byte offset 3"):
        build_mvsa(MVSAConfig(root=str(tmp_path), encoding="ascii"))
    with pytest.raises(DataError, match="data.encoding: unknown encoding 'klingon'"):
        build_mvsa(MVSAConfig(root=str(tmp_path), encoding="klingon"))
    # Line-oriented raw files (the HFM release) are read as data.encoding, with file:line on a bad byte.
    hfm = tmp_path / "hfm"
    hfm.mkdir()
    (hfm / "train.txt").write_bytes((repr(["1", "caf\u00e9", 1]) + "\n").encode("cp1252"))
    (hfm / "test2.txt").write_text(repr(["2", "fine", 0, 0]) + "\n")
    with pytest.raises(DataError, match=r"train\.txt:1: not utf-8 text: byte 0xe9"):
        build_hfm(HFMConfig(root=str(hfm)))
    assert build_hfm(HFMConfig(root=str(hfm), encoding="cp1252")).splits["train"][0].text == "caf\u00e9"


def test_mvsa_multiple_three_annotator_vote(tmp_path):
    rows = {
        # text: pos,pos,neg → pos ; image: neu,pos,pos → pos ; → positive
        "10": "positive,neutral\tpositive,positive\tnegative,positive",
        # text: neu,pos,neg → no majority → dropped
        "11": "neutral,neutral\tpositive,neutral\tnegative,neutral",
        # text: neg,neg,neu → neg ; image: neu,neu,pos → neu ; → negative
        "12": "negative,neutral\tnegative,neutral\tneutral,positive",
        # text: pos,pos,pos ; image: neg,neg,neu → neg ; positive+negative → dropped
        "13": "positive,negative\tpositive,negative\tpositive,neutral",
        # image: pos,neg,neu → no majority → dropped even though text agrees
        "14": "neutral,positive\tneutral,negative\tneutral,neutral",
        # all neutral
        "15": "neutral,neutral\tneutral,neutral\tneutral,neutral",
    }
    _mvsa_tree(tmp_path, rows, "ID\ttext,image\ttext,image\ttext,image", with_lists=False)
    b = build_mvsa(MVSAMultipleConfig(root=str(tmp_path), seed=3))
    assert b.name == "mvsa-multiple"
    got = {s.id: s.label for v in b.splits.values() for s in v}
    assert got == {"10": LABEL["positive"], "12": LABEL["negative"], "15": LABEL["neutral"]}
    # No split lists: a deterministic stratified split, same result twice.
    again = build_mvsa(MVSAMultipleConfig(root=str(tmp_path), seed=3))
    assert {k: ids(v) for k, v in b.splits.items()} == {k: ids(v) for k, v in again.splits.items()}


def test_mvsa_bad_label_line(tmp_path):
    _mvsa_tree(tmp_path, {"1": "positive,positive", "2": "positive,happy"}, "ID\ttext,image")
    with pytest.raises(DataError, match=r"labelResultAll\.txt:3: .*'positive,happy'"):
        build_mvsa(MVSAConfig(root=str(tmp_path)))


def _clmlf_tree(root: Path, n: int = 4, images: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for split in ("train", "dev", "test"):
        rows = [{"id": str(k + i), "text": f"text {k + i}", "emotion_label": (k + i) % 3} for i in range(n)]
        k += n
        (root / f"{split}.json").write_text(json.dumps(rows, indent=1))
        if images:
            for r in rows:
                jpeg(root / "dataset_image" / f"{r['id']}.jpg")


def test_mvsa_clmlf_json_and_image_folder(tmp_path):
    _clmlf_tree(tmp_path)
    b = build_mvsa(MVSAConfig(root=str(tmp_path)))
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 4, "dev": 4, "test": 4}
    assert b.modalities == ("text", "image")
    assert [s.label for s in b.splits["train"]] == [0, 1, 2, 0]
    (tmp_path / "translation.json").write_text(json.dumps([{"id": "0", "text_translation": "back"}]))
    tr = build_mvsa(MVSAConfig(root=str(tmp_path), use_translation=True))
    assert tr.splits["train"][0].extra["translation"] == "back" and tr.splits["train"][1].extra["translation"] is None
    assert all(Path(s.image).name == f"{s.id}.jpg" for v in b.splits.values() for s in v)
    # Without the image folder the copy is text-only (not an error) and no sample points at an image.
    for p in (tmp_path / "dataset_image").iterdir():
        p.unlink()
    (tmp_path / "dataset_image").rmdir()
    t = build_mvsa(MVSAConfig(root=str(tmp_path)))
    assert t.modalities == ("text",) and all(s.image is None for v in t.splits.values() for s in v)


def test_clmlf_json_syntax_error_names_line(tmp_path):
    _clmlf_tree(tmp_path, images=False)
    (tmp_path / "dev.json").write_text('[\n {"id": "1", "text": "a", "emotion_label": 0},\n {"id": "2" "text": "b"}\n]')
    with pytest.raises(DataError, match=r"dev\.json:3:\d+: invalid JSON"):
        build_mvsa(MVSAConfig(root=str(tmp_path)))


def test_clmlf_json_bad_rows_name_file_and_item(tmp_path):
    """The one CLMLF reader serves MVSA (3 labels) and HFM (2): a label out of range or a missing field is named."""
    from mmsenti.data.formats.hfm import HFMConfig, build_hfm

    _clmlf_tree(tmp_path, images=False)  # labels 0, 1, 2: fine for MVSA, label 2 is out of range for HFM
    assert len(build_mvsa(MVSAConfig(root=str(tmp_path))).splits["train"]) == 4
    (tmp_path / "valid.json").write_bytes((tmp_path / "dev.json").read_bytes())
    (tmp_path / "dev.json").unlink()
    with pytest.raises(DataError, match=r"train\.json: item 2: emotion_label must be in 0\.\.1, got 2"):
        build_hfm(HFMConfig(root=str(tmp_path)))
    (tmp_path / "test.json").write_text(json.dumps([{"id": "7", "emotion_label": 0}]))
    with pytest.raises(DataError, match=r"test\.json: item 0: expected id, text"):
        build_mvsa(MVSAConfig(root=str(tmp_path)))


# ------------------------------------------------------------------------------------------------ missing images
@pytest.mark.parametrize("policy", ["error", "drop", "blank"])
def test_missing_image_policy(tmp_path, policy, caplog):
    _clmlf_tree(tmp_path)
    (tmp_path / "dataset_image" / "5.jpg").unlink()
    (tmp_path / "dataset_image" / "9.jpg").unlink()
    cfg = MVSAConfig(root=str(tmp_path), missing_images=policy)
    if policy == "error":
        with pytest.raises(DataError, match=r"2 of 12 images missing .*first ids: 5, 9.*missing_images=drop"):
            build_mvsa(cfg)
        return
    with caplog.at_level(logging.WARNING):
        b = build_mvsa(cfg)
    every = {s.id: s for v in b.splits.values() for s in v}
    if policy == "drop":
        assert set(every) == {str(i) for i in range(12)} - {"5", "9"}
        assert "dropped 2 post(s)" in caplog.text and "dev 1, test 1" in caplog.text
    else:
        assert len(every) == 12 and "2 post(s) have no usable image file" in caplog.text
        for sid in ("5", "9"):
            assert every[sid].extra["image_missing"] is True
            assert isinstance(every[sid].image, Image.Image)
            assert every[sid].image.getpixel((0, 0)) == BLANK_RGB
        assert "image_missing" not in every["4"].extra and Path(every["4"].image).is_file()
        # The doctor still counts a blank-filled image as missing.
        report = doctor.check(b)
        assert report.splits["dev"].images == {"missing": ["5"]} and report.splits["dev"].blank_images == 1


# ------------------------------------------------------------------------------------------------ images
def test_inspect_image_problems(tmp_path):
    good = jpeg(tmp_path / "good.jpg", size=(64, 64))
    assert inspect_image(good) is None and inspect_image(good, decode=True) is None
    # JPEG content under a .png name is fine: the format is read from the bytes.
    disguised = tmp_path / "meme.png"
    disguised.write_bytes(good.read_bytes())
    assert inspect_image(disguised) is None
    # Zero padding after the end-of-image marker is fine too.
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(good.read_bytes() + b"\x00" * 10)
    assert inspect_image(padded) is None
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noisy.save(tmp_path / "noisy.jpg", quality=95)
    data = (tmp_path / "noisy.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert inspect_image(tmp_path / "cut.jpg") == "truncated"
    assert inspect_image(tmp_path / "cut.jpg", decode=True) == "truncated"
    noisy.save(tmp_path / "noisy.png")
    data = (tmp_path / "noisy.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert inspect_image(tmp_path / "cut.png") == "truncated"
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    assert inspect_image(tmp_path / "junk.jpg") == "unreadable"
    assert inspect_image(tmp_path / "absent.jpg") == "missing"


# ------------------------------------------------------------------------------------------------ HFM
def test_hfm_raw_filter_last_label_and_attributes(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    train = [
        ["1", "what a lovely monday # blessed", 1],
        ["2", "this is sarcasm obviously", 1],  # giveaway word → dropped
        ["3", "i love # sarcasm", 1],  # "# sarcasm" splits into the token "sarcasm" → dropped
        ["4", "#sarcasm glued to the hash", 1],  # the token is "#sarcasm": kept (the rule is on whole tokens)
        ["5", "look at this <url>", 0],  # "<url>" is on the list → dropped
        ["6", "good jokes here", 0],  # "jokes" → dropped
        ["7", "Irony with a capital", 0],  # case-sensitive like the release: kept
        ["8", "exgag", 1],  # dropped
        ["9", "plain post", 0],
    ]
    (raw / "train.txt").write_text("".join(repr(r) + "\n" for r in train))
    (raw / "valid2.txt").write_text(repr(["20", "it 's sarcasm", 1, 0]) + "\n" + repr(["21", "ok", 0, 1]) + "\n")
    (raw / "test2.txt").write_text(repr(["30", "fine", 1, 1]) + "\n")
    attributes = "".join(repr([i, "a", "b", "c", "d", "e"]) + "\n" for i in ["1", "4", "20"])
    (raw / "image_attributes.txt").write_text(attributes)
    b = build_hfm(HFMConfig(root=str(tmp_path), use_attributes=True))
    assert ids(b.splits["train"]) == ["1", "4", "7", "9"]
    assert [s.label for s in b.splits["train"]] == [1, 1, 0, 0]
    # valid2/test2: the last element (the human label) is the label; the filter is for training only.
    assert [(s.id, s.label) for s in b.splits["dev"]] == [("20", 0), ("21", 1)]
    assert b.splits["train"][0].tags == ["a", "b", "c", "d", "e"]
    assert b.splits["train"][2].tags == []  # no attribute line for post 7
    assert b.modalities == ("text", "tags") and b.label_names == ["not-sarcastic", "sarcastic"]
    unfiltered = build_hfm(HFMConfig(root=str(tmp_path), filter_train=False))
    assert len(unfiltered.splits["train"]) == len(train)
    assert "exgag" in FILTER_WORDS and len(FILTER_WORDS) == 11


def test_hfm_raw_bad_line(tmp_path):
    (tmp_path / "train.txt").write_text("['1', 'ok', 1]\n['2', 'broken, 1]\n")
    with pytest.raises(DataError, match=r"train\.txt:2: not a Python list literal"):
        build_hfm(HFMConfig(root=str(tmp_path)))


# ------------------------------------------------------------------------------------------------ TumEmo
def test_tumemo_mgnns_and_raw(tmp_path):
    (tmp_path / "label.json").write_text(json.dumps({"sad": 1, "happy": 0}))
    rows = [{"id": "1", "text": "sunny day", "image": "data/image_data/val_image/1.jpg", "label": "happy",
             "places": [3], "objects": [1, 1]},
            {"id": "2", "text": "rainy", "image": "data/image_data/val_image/2.jpg", "label": "sad"}]
    (tmp_path / "val_all_anno.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test_row = dict(rows[0], id="3", image="data/image_data/test_image/3.jpg")
    (tmp_path / "test_all_anno.json").write_text(json.dumps(test_row) + "\n{bad json\n")
    with pytest.raises(DataError, match=r"test_all_anno\.json:2: invalid JSON"):
        build_tumemo(TumEmoConfig(root=str(tmp_path)))
    (tmp_path / "test_all_anno.json").write_text(json.dumps(test_row) + "\n")
    b = build_tumemo(TumEmoConfig(root=str(tmp_path), carve_dev=0))
    assert list(b.splits) == ["dev", "test"] and b.label_names == ["happy", "sad"]
    assert [s.label for s in b.splits["dev"]] == [0, 1] and b.splits["dev"][0].extra["places"] == [3]
    assert b.modalities == ("text",)
    with pytest.raises(DataError, match="no split 'train'"):
        b.split("train")
    # With the image folders present the image paths are used and a missing one is an error.
    jpeg(tmp_path / "data/image_data/val_image/1.jpg")
    with pytest.raises(DataError, match=r"2 of 3 images missing .*first ids: 2, 3"):
        build_tumemo(TumEmoConfig(root=str(tmp_path)))
    b = build_tumemo(TumEmoConfig(root=str(tmp_path), missing_images="drop", carve_dev=0))
    assert ids(b.splits["dev"]) == ["1"] and "test" not in b.splits and b.modalities == ("text", "image")

    raw = tmp_path / "raw"
    (raw / "data").mkdir(parents=True)
    (raw / "all_data_id_and_label.txt").write_text("id emotion\n" + "".join(
        f"{i} {'Happy' if i % 2 else 'Sad'}\n" for i in range(1, 21)))
    for i in range(1, 21):
        (raw / "data" / f"{i}.txt").write_text(f"text {i}")
    b = build_tumemo(TumEmoConfig(root=str(raw)))
    assert b.label_names == ["angry", "bored", "calm", "fear", "happy", "love", "sad"]  # no label.json: default
    assert sum(len(v) for v in b.splits.values()) == 20 and len(b.splits["test"]) == 2
    assert Counter(s.label for s in b.splits["test"]) == {4: 1, 6: 1}  # stratified


def test_tumemo_tags_and_the_carve_of_train_and_dev_from_val(tmp_path):
    """places/objects become tags (repeats dropped, opaque ids); with no train file, train and dev are carved from
    val: stratified by label, the same for the same seed, another for another seed, test untouched."""
    (tmp_path / "label.json").write_text(json.dumps({"happy": 0, "sad": 1, "calm": 2}))
    labels = ["happy"] * 60 + ["sad"] * 30 + ["calm"] * 10
    rows = [{"id": str(i), "text": f"post {i}", "image": f"v/{i}.jpg", "label": lab, "places": [i % 7],
             "objects": [5, 5, i % 3]} for i, lab in enumerate(labels)]
    (tmp_path / "val_all_anno.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test_all_anno.json").write_text(json.dumps(dict(rows[0], id="t0")) + "\n")
    b = build_tumemo(TumEmoConfig(root=str(tmp_path), tags=["places", "objects"], carve_dev=0.2))
    assert list(b.splits) == ["train", "dev", "test"] and b.modalities == ("text", "tags")
    assert [len(b.splits[k]) for k in ("train", "dev", "test")] == [80, 20, 1]
    assert Counter(b.label_names[s.label] for s in b.splits["dev"]) == {"happy": 12, "sad": 6, "calm": 2}
    assert not {s.id for s in b.splits["train"]} & {s.id for s in b.splits["dev"]}
    assert b.splits["test"][0].tags == ["place0", "object5", "object0"]
    again = build_tumemo(TumEmoConfig(root=str(tmp_path), carve_dev=0.2))
    assert ids(again.splits["dev"]) == ids(b.splits["dev"]) and again.splits["dev"][0].tags is None
    other = build_tumemo(TumEmoConfig(root=str(tmp_path), carve_dev=0.2, seed=1))
    assert ids(other.splits["dev"]) != ids(b.splits["dev"])
    with pytest.raises(DataError, match="data.tags: unknown colours"):
        build_tumemo(TumEmoConfig(root=str(tmp_path), tags=["colours"]))


# ------------------------------------------------------------------------------------------------ MMSA
def _mmsa_part(n: int, start: int, rng: np.random.Generator) -> dict:
    audio = rng.normal(size=(n, 7, 5)).astype(np.float32)
    audio[0, 1, 2] = -np.inf
    return {
        "id": np.array([f"vid{start + i}$_${i}" for i in range(n)]),
        "raw_text": [f"clip {start + i}" for i in range(n)],
        "audio": audio, "vision": rng.normal(size=(n, 9, 4)).astype(np.float32),
        "text": rng.normal(size=(n, 6, 3)).astype(np.float32),
        "audio_lengths": [7 - i % 3 for i in range(n)], "vision_lengths": [1 + i for i in range(n)],
        "regression_labels": np.linspace(-3, 3, n).astype(np.float32),
    }


def test_mmsa_pickle_round_trip(tmp_path, caplog):
    rng = np.random.default_rng(0)
    data = {"train": _mmsa_part(5, 0, rng), "valid": _mmsa_part(3, 100, rng), "test": _mmsa_part(4, 200, rng)}
    with open(tmp_path / "unaligned_50.pkl", "wb") as f:
        pickle.dump(data, f)
    # A pickle is read only when trusted; converted once, the .npz beside it is read instead (no trust needed).
    with pytest.raises(DataError, match=r"unaligned_50\.pkl is a Python pickle.*mmsenti data convert.*trust_pickle"):
        build_mmsa(MMSAConfig(root=str(tmp_path)))
    trusted = build_mmsa(MMSAConfig(root=str(tmp_path), trust_pickle=True))
    assert convert_pickle(tmp_path / "unaligned_50.pkl") == tmp_path / "unaligned_50.npz"
    with caplog.at_level(logging.WARNING):
        b = build_mmsa(MMSAConfig(root=str(tmp_path)))
    assert b.sources == [tmp_path / "unaligned_50.npz"]
    assert [(s.id, s.text, s.label) for s in b.splits["train"]] == [(s.id, s.text, s.label) for s in trusted.splits["train"]]
    assert "set 1 non-finite value(s) of train audio to 0" in caplog.text
    assert b.task == "regression" and b.label_names is None and b.modalities == ("text", "audio", "vision")
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 5, "dev": 3, "test": 4}
    for split, key in (("train", "train"), ("dev", "valid"), ("test", "test")):
        part = data[key]
        for i, s in enumerate(b.splits[split]):
            assert s.id == str(part["id"][i]).replace("$_$", "_") and s.text == part["raw_text"][i]
            assert s.label == pytest.approx(float(part["regression_labels"][i]))
            assert set(s.features) == {"audio", "vision"}
            a = part["audio"][i, : part["audio_lengths"][i]]
            assert s.features["audio"].shape == a.shape
            np.testing.assert_array_equal(s.features["audio"], np.where(np.isfinite(a), a, 0))
            np.testing.assert_array_equal(s.features["vision"], part["vision"][i, : part["vision_lengths"][i]])
    with_text = build_mmsa(MMSAConfig(root=str(tmp_path), text_features=True))
    assert with_text.splits["dev"][0].features["text"].shape == (6, 3)
    # label.csv for text-only use; features="none" prefers it over the pickle.
    (tmp_path / "label.csv").write_text('id,text,label,mode\na_1,"hello, world",1.5,train\nb_2,meh,-0.4,valid\n'
                                        "c_3,bad,-3,test\n")
    t = build_mmsa(MMSAConfig(root=str(tmp_path), features="none"))
    assert t.modalities == ("text",)
    assert [(s.id, s.text, s.label) for s in t.splits["train"]] == [("a_1", "hello, world", 1.5)]
    assert ids(t.splits["dev"]) == ["b_2"]
    (tmp_path / "label.csv").write_text("id,text,label,mode\na_1,x,1.5,train\nb_2,y,high,test\n")
    with pytest.raises(DataError, match=r"label\.csv:3: label 'high' is not a number"):
        build_mmsa(MMSAConfig(root=str(tmp_path), features="none"))


# ------------------------------------------------------------------------------------------------ memes
def _memes_tree(root: Path, n_train: int = 40) -> None:
    header = "Name,Text,Valence,Sarcasm,Level1,Level2,Joy,Sadness,Anger,Fear,Surprise\n"
    vals = ["negative", "neutral", "positive", "negative"]
    rows = [f"m{i}.png,\"meme, {i}\",{vals[i % 4]},sarcasm,off,implicit,1,0,0,0,0\n" for i in range(n_train)]
    (root / "images").mkdir(parents=True)
    (root / "train.csv").write_text(header + "".join(rows))
    (root / "dev.csv").write_text(header + "d0.png,dev meme,neutral,non-sarcastic,non-off,non-off,0,0,1,0,0\n")
    for i in range(n_train):
        jpeg(root / "images" / f"m{i}.png")
    jpeg(root / "images" / "d0.png")


def test_memes_splits(tmp_path):
    _memes_tree(tmp_path)
    b = build_memes(MemesConfig(root=str(tmp_path)))
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 34, "dev": 6, "test": 1}
    # round(0.15 * 40) = 6 carved: shares 3 / 1.5 / 1.5, floors 3 / 1 / 1, the spare place to the first tie (neutral).
    assert Counter(s.label for s in b.splits["dev"]) == {0: 3, 1: 2, 2: 1}
    assert b.splits["test"][0].extra == {"sarcasm": "non-sarcastic", "offensive": "non-off",
                                         "offensive_level": "non-off",
                                         "emotions": {"joy": 0, "sadness": 0, "anger": 1, "fear": 0, "surprise": 0}}
    assert b.splits["train"][0].text == "meme, 0" and b.modalities == ("text", "image")
    other = build_memes(MemesConfig(root=str(tmp_path), seed=1))
    assert set(ids(other.splits["dev"])) != set(ids(b.splits["dev"]))
    (tmp_path / "dev.csv").write_text("Name,Text,Valence\nd0.png,x,grumpy\n")
    with pytest.raises(DataError, match=r"dev\.csv:2: unknown label 'grumpy'"):
        build_memes(MemesConfig(root=str(tmp_path)))


# ------------------------------------------------------------------------------------------------ user data
def test_user_jsonl_single_file(tmp_path):
    jpeg(tmp_path / "img" / "a.jpg")
    jpeg(tmp_path / "img" / "b.jpg")
    rows = [
        {"id": "a", "text": "great", "image": "img/a.jpg", "label": "pos", "split": "train", "source": "x"},
        {"id": "b", "text": "awful", "image": "img/b.jpg", "label": "neg", "split": "valid"},
        {"text": "meh", "image": str(tmp_path / "img" / "a.jpg"), "label": "neg"},  # absolute path, no id/split
    ]
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    # Three posts are too few to read the classes off the data: the names must be declared.
    with pytest.raises(DataError, match=r"labels read off the data .* look wrong.*data\.label_names=\[neg,pos\]"):
        build_jsonl(UserDataConfig(root=str(f)))
    b = build_jsonl(UserDataConfig(root=str(f), label_names=["neg", "pos"]))
    assert b.label_names == ["neg", "pos"] and b.modalities == ("text", "image")
    assert [(s.id, s.label) for s in b.splits["train"]] == [("a", 1), ("mine:3", 0)]
    assert ids(b.splits["dev"]) == ["b"] and Path(b.splits["dev"][0].image) == tmp_path / "img" / "b.jpg"
    assert b.splits["train"][0].extra == {"source": "x"}
    b2 = build_jsonl(UserDataConfig(root=str(f), label_names=["pos", "neg", "other"]))
    assert [s.label for s in b2.splits["train"]] == [0, 1]
    with pytest.raises(DataError, match=r"mine\.jsonl:1: unknown label 'pos'"):
        build_jsonl(UserDataConfig(root=str(f), label_names=["neg", "neutral"]))


def test_user_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1\n')
    with pytest.raises(DataError, match=r"data\.jsonl:3: invalid JSON"):
        build_jsonl(UserDataConfig(root=str(f)))
    f.write_text('{"text": "a", "label": 0}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: expected a JSON object"):
        build_jsonl(UserDataConfig(root=str(f)))
    f.write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: no 'label' value"):
        build_jsonl(UserDataConfig(root=str(f)))


def test_user_csv_directory_and_bad_row(tmp_path):
    (tmp_path / "train.csv").write_text('text,label\n"two\nlines",1\nplain,0\nthird,2\nfourth,1\n')
    (tmp_path / "test.csv").write_text("text,label\nt,0\n")
    b = build_csv(CsvDataConfig(root=str(tmp_path), dev_fraction=0.25, seed=0, label_names=["0", "1", "2"]))
    assert b.label_names == ["0", "1", "2"] and b.modalities == ("text",)
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 3, "dev": 1, "test": 1}
    every = {s.id: s for v in b.splits.values() for s in v}
    assert every["train:2"].text == "two\nlines" and every["train:4"].label == 0
    assert [s.label for s in b.splits["dev"]] == [1]  # 0.25 * 4 = 1 place, to the class with the largest share
    assert {s.id for v in b.splits.values() for s in v} == {"train:2", "train:4", "train:5", "train:6", "test:2"}
    # The quoted field spans lines 2-3, so the row with too many fields is on line 5.
    (tmp_path / "train.csv").write_text('text,label\n"two\nlines",1\nplain,0\ntoo,many,fields\n')
    with pytest.raises(DataError, match=r"train\.csv:5: expected 2 fields, got 3"):
        build_csv(CsvDataConfig(root=str(tmp_path)))
    (tmp_path / "train.csv").write_text("text,label\nfine,0\nshort\n")
    with pytest.raises(DataError, match=r"train\.csv:3: expected 2 fields, got 1"):
        build_csv(CsvDataConfig(root=str(tmp_path)))
    rows = list(read_csv(tmp_path / "test.csv"))
    assert rows == [(2, {"text": "t", "label": "0"})]


def test_user_regression_and_split_conflict(tmp_path):
    f = tmp_path / "scores.tsv"
    f.write_text("text\tlabel\tsplit\na\t0.5\ttrain\nb\t-1\ttest\n")
    b = build_csv(CsvDataConfig(root=str(f), task="regression"))
    assert b.label_names is None and b.task == "regression" and [s.label for s in b.splits["test"]] == [-1.0]
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0, "split": "test"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:1: split is 'test' in the train file"):
        build_jsonl(UserDataConfig(root=str(tmp_path)))


def test_duplicate_ids_are_an_error_and_the_doctor_lists_them(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "x", "text": "a", "label": 0}, {"id": "x", "text": "b", "label": 1},
        {"id": "y", "text": "c", "label": 0, "split": "test"}, {"id": "y", "text": "c", "label": 0},
    ]))
    with pytest.raises(DataError, match=r"2 duplicate id\(s\) \(first: x, y\)"):
        build_jsonl(UserDataConfig(root=str(f)))
    report = doctor.check(UserDataConfig(root=str(f)))  # loads leniently
    assert report.duplicate_ids == {"train": ["x"]} and report.shared_ids == {"train/test": ["y"]}
    assert report.has_errors


# ------------------------------------------------------------------------------------------------ doctor
def test_doctor_report_numbers(tmp_path):
    for name in ("a", "b", "c", "t1"):
        jpeg(tmp_path / f"{name}.jpg", size=(48, 48))
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noisy.save(tmp_path / "full.jpg", quality=95)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:900])
    (tmp_path / "junk.jpg").write_bytes(b"nope")
    rows = [
        ("a", "good day", "a.jpg", "pos", "train"), ("b", "  ", "b.jpg", "neg", "train"),
        ("c", "", "c.jpg", "pos", "train"), ("d", "cut file", "cut.jpg", "pos", "train"),
        ("e", "no file", "gone.jpg", "neg", "dev"), ("f", "junk", "junk.jpg", "neg", "dev"),
        ("t1", "test one", "t1.jpg", "pos", "test"), ("a2", "ok", "a.jpg", "pos", "test"),
    ]
    f = tmp_path / "set.jsonl"
    f.write_text("".join(json.dumps({"id": i, "text": t, "image": im, "label": y, "split": s}) + "\n"
                         for i, t, im, y, s in rows))
    cfg = UserDataConfig(root=str(f))
    with pytest.raises(DataError, match=r"3 of 8 images missing or unusable \(missing 1, unreadable 1, truncated 1\)"):
        build_jsonl(cfg)
    r = doctor.check(cfg)
    assert r.label_names == ["neg", "pos"]
    assert {k: (c.size, c.labels) for k, c in r.splits.items()} == {
        "train": (4, {"neg": 1, "pos": 3}), "dev": (2, {"neg": 2, "pos": 0}), "test": (2, {"neg": 0, "pos": 2})}
    assert r.splits["train"].empty_texts == ["b", "c"]
    assert r.splits["train"].images == {"truncated": ["d"]}
    assert r.splits["dev"].images == {"missing": ["e"], "unreadable": ["f"]}
    assert r.splits["test"].images == {} and r.images_checked == 8
    assert r.duplicate_ids == {} and r.shared_ids == {} and r.has_errors
    text = doctor.format_report(r)
    assert "ERROR   train: 1 truncated image(s) (first: d)" in text
    assert "ERROR   dev: 1 missing image(s) (first: e)" in text and "warning train: 2 empty text(s)" in text
    assert "3 error(s), 1 warning(s)" in text

    s = doctor.stats(cfg)
    words = [len(t.split()) for _, t, *_ in rows[:4]]
    assert s.splits["train"].labels == {"neg": 1, "pos": 3} and s.splits["train"].majority == 0.75
    d = s.splits["train"].text_words
    assert d["max"] == max(words) and d["mean"] == pytest.approx(np.mean(words)) and d["median"] == np.median(words)
    assert d["p90"] == np.percentile(words, 90, method="inverted_cdf")
    assert "majority share train 0.750" in doctor.format_report(s)


def test_doctor_stats_match_numpy():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 100, 257).tolist()
    d = doctor.describe(values)
    for q, key in ((50, "median"), (90, "p90"), (95, "p95")):
        if key != "median":
            assert d[key] == np.percentile(values, q, method="inverted_cdf")
    assert d["median"] == np.median(values) and d["min"] == min(values) and d["max"] == max(values)
    assert doctor.describe([]) == {}


# ------------------------------------------------------------------------------------------------ splits, text
def test_carve_split_is_stratified_and_order_independent():
    samples = [Sample(id=f"s{i}", label=i % 3 if i < 90 else 0) for i in range(120)]
    rest, dev = carve_split(samples, 0.2, seed=7)
    counts = Counter(s.label for s in dev)
    assert counts == {0: round(0.2 * 60), 1: 6, 2: 6}
    assert set(ids(rest)).isdisjoint(ids(dev)) and len(rest) + len(dev) == 120
    assert ids(dev) == [s.id for s in samples if s.id in set(ids(dev))]  # input order kept
    _, dev_rev = carve_split(samples[::-1], 0.2, seed=7)
    assert set(ids(dev_rev)) == set(ids(dev))
    assert set(ids(carve_split(samples, 0.2, seed=8)[1])) != set(ids(dev))
    parts = random_splits(samples, seed=0)
    assert sorted(len(v) for v in parts.values()) == [12, 12, 96]
    assert sum(len(v) for v in parts.values()) == 120 and len({s.id for v in parts.values() for s in v}) == 120


@pytest.mark.parametrize("raw, expected", [
    ("RT @bob_1: hi there", "RT <user>: hi there"),
    ("mail me at a@b.com", "mail me at a@b.com"),  # not a mention
    (".@MHingis & @Leander win", ".<user> & <user> win"),
    ("see https://t.co/AbC123 now", "see <url> now"),
    ("truncated by twitter http:/", "truncated by twitter <url>"),
    ("cut http", "cut <url>"),
    ("visit www.example.com!", "visit <url>"),
    ("#Love #in2015 and C# & #", "# Love # in2015 and C# & #"),
    ("fish &amp; chips &lt;3", "fish & chips <3"),
    ("so funny 😂😂", "so funny :face_with_tears_of_joy: :face_with_tears_of_joy:"),
    ("thumbs 👍🏽 and ❤️", "thumbs :thumbs_up_sign: and :heavy_black_heart:"),
    ("go 🇺🇸 go", "go :flag_us: go"),
    ("  many   spaces\n", "many spaces"),
])
def test_normalize_tweet(raw, expected):
    assert normalize_tweet(raw) == expected
    assert normalize_tweet(expected) == expected  # idempotent


def test_normalize_tweet_options():
    assert normalize_tweet("#Tag 😂 @x", hashtags="strip", emoji="remove", users=False) == "Tag @x"
    assert normalize_tweet("#Tag 😂", hashtags="keep", emoji="keep") == "#Tag 😂"
    assert normalize_tweet("") == ""
