"""User data that must not be silently corrupted: CSV quoting, mistyped labels, encodings, broken images, bombs."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsenti.config import load_config
from mmsenti.data import doctor
from mmsenti.data.base import DataError
from mmsenti.data.formats.images import BLANK_RGB, inspect_image
from mmsenti.data.formats.user import CsvDataConfig, UserDataConfig, build_csv, build_jsonl
from mmsenti.data.processing import open_image
from mmsenti.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
LABELS = ["negative", "neutral", "positive"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mmsenti", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=ENV)


@pytest.fixture(autouse=True)
def _restore_pil_limit():
    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


# ------------------------------------------------------------------------------------------------ PNG files
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, idat: bytes, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG file with valid chunk checksums around whatever ``idat`` holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def bomb(path: Path, side: int = 15000) -> Path:
    """A real decompression bomb: a ~30 kB PNG that decodes to side² pixels (1-bit, all zero)."""
    row = b"\x00" * (1 + (side + 7) // 8)
    path.write_bytes(png(side, side, zlib.compress(row * side, 9), bit_depth=1, colour=0))
    return path


def noisy_png(path: Path, seed: int = 0, size: int = 24) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def corrupt_body_png(path: Path) -> Path:
    """A PNG whose compressed pixel data has a flipped byte (its IDAT checksum no longer matches)."""
    data = bytearray(noisy_png(path, seed=99).read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_corrupt_png_body_is_found_by_the_fast_check(tmp_path):
    good = noisy_png(tmp_path / "good.png")
    assert inspect_image(good) is None and inspect_image(good, decode=True) is None
    assert inspect_image(corrupt_body_png(tmp_path / "flipped.png")) == "unreadable"
    # Checksums intact, pixel data garbage: only decoding finds it (`data check --decode`, data.image_check=decode).
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(png(16, 16, b"this is not deflate data"))
    assert inspect_image(garbage) is None and inspect_image(garbage, decode=True) in ("unreadable", "truncated")


# ------------------------------------------------------------------------------------------------ CSV quoting
def _rows(n: int) -> list[str]:
    return [f"post number {i},img{i}.jpg,{LABELS[i % 3]}" for i in range(n)]


def test_unterminated_quote_that_swallows_rows_is_an_error(tmp_path):
    rows = _rows(40)
    rows[4] = '"Great day at the beach,img4.jpg,positive'  # never closed...
    rows[16] = '"Sunset",img16.jpg,neutral'  # ...until this quote: rows 5-15 vanish into one text
    f = tmp_path / "posts.csv"
    f.write_text("text,image,label\n" + "\n".join(rows) + "\n")
    with open(f, newline="") as fh:  # what the csv module makes of it: 11 rows fewer, no complaint
        assert len(list(csv.DictReader(fh))) == 40 - 11 - 1
    with pytest.raises(DataError, match=r"posts\.csv:6: an unterminated quote on line 6 swallows lines 7-18"):
        build_csv(CsvDataConfig(root=str(f), label_names=LABELS))


def test_long_quoted_fields_and_quotes_open_at_the_end(tmp_path):
    f = tmp_path / "posts.csv"
    poem = "\n".join(f"line {i}" for i in range(12))
    f.write_text('text,label\n"two\nlines",positive\n"' + poem + '",negative\nok,neutral\n')
    with pytest.raises(DataError, match=r"posts\.csv:4: one record spans lines 4-15 \(12 lines, more than 10\)"):
        build_csv(CsvDataConfig(root=str(f), label_names=LABELS))
    b = build_csv(CsvDataConfig(root=str(f), label_names=LABELS, max_record_lines=20))
    assert [s.text.count("\n") for s in b.splits["train"]] == [1, 11, 0]
    f.write_text('text,label\nfine,positive\n"never closed,negative\nnext,neutral\n')
    with pytest.raises(DataError, match=r"posts\.csv:3: expected 2 fields, got 1 \(the record runs from line 3 to "
                                        r"line 4: an unterminated quote on line 3\?\)"):
        build_csv(CsvDataConfig(root=str(f), label_names=LABELS))


def test_line_endings_of_every_kind_read_alike(tmp_path):
    """Reading bytes line by line (for byte offsets) must not lose the \\r-only endings csv's newline="" accepts."""
    text = 'text,label\n"two\nlines",positive\nplain,negative\n'
    rows = []
    for name, ending in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
        (tmp_path / f"{name}.csv").write_bytes(text.replace("\n", ending).encode())
        b = build_csv(CsvDataConfig(root=str(tmp_path / f"{name}.csv"), label_names=LABELS))
        rows.append([(s.id.split(":")[1], s.text.replace(ending, "\n"), s.label) for s in b.splits["train"]])
    assert rows[0] == rows[1] == rows[2] == [("2", "two\nlines", 2), ("4", "plain", 0)]


def test_quote_closed_inside_a_field_two_lines_later_is_an_error(tmp_path):
    """An open quote that the next row's quoted text closes: csv reads 2 rows as 1 record of the right width."""
    f = tmp_path / "posts.csv"
    f.write_text('text,label\nfine,positive\n"rain again,negative\n"sun at last" \'really\',positive\nlast,neutral\n')
    with open(f, newline="") as fh:  # what the csv module makes of it: one post fewer, no complaint
        assert [r["label"] for r in csv.DictReader(fh)] == ["positive", "positive", "neutral"]
    with pytest.raises(DataError, match=r"posts\.csv:3: an unterminated quote on line 3\? The record it opens runs to "
                                        r"line 4, where a quote ends it inside a field"):
        build_csv(CsvDataConfig(root=str(f), label_names=LABELS))


# ------------------------------------------------------------------------------------------------ labels
def _labelled(n: int, typo_at: int | None = None) -> list[str]:
    labels = [LABELS[i % 3] for i in range(n)]
    if typo_at is not None:
        labels[typo_at] = "neutrall"
    return labels


def test_mistyped_label_is_never_a_new_class(tmp_path):
    labels = _labelled(60, typo_at=7)
    f = tmp_path / "posts.csv"
    f.write_text("text,label\n" + "".join(f"post {i},{y}\n" for i, y in enumerate(labels)))
    with pytest.raises(DataError) as e:
        build_csv(CsvDataConfig(root=str(f)))
    msg = str(e.value)
    assert "'neutrall': 1 post(s), close to 'neutral' (ids: posts:9)" in msg
    assert "Classes and posts: negative 20, neutral 19, neutrall 1, positive 20" in msg
    assert "--set data.label_names=[negative,neutral,positive]" in msg and "\n" not in msg
    report = doctor.check(CsvDataConfig(root=str(f)))  # the doctor reports it instead of raising
    assert report.has_errors and any("neutrall" in err for err in report.errors())
    # Declared classes: the typo is an error naming its line, as for every other unknown label.
    with pytest.raises(DataError, match=r"posts\.csv:9: unknown label 'neutrall'"):
        build_csv(CsvDataConfig(root=str(f), label_names=LABELS))
    f.write_text("text,label\n" + "".join(f"post {i},{y}\n" for i, y in enumerate(_labelled(60))))
    assert build_csv(CsvDataConfig(root=str(f))).label_names == sorted(LABELS)  # clean data: names read off it


def test_class_found_in_one_split_only(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(
        f"t{i},{'positive' if i % 2 else 'negative'}\n" for i in range(40)))
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(
        f"e{i},{'pos' if i % 2 else 'negative'}\n" for i in range(10)))
    with pytest.raises(DataError, match=r"'pos': only in test, none in train.*'positive': only in train, none in "
                                        r"test"):
        build_csv(CsvDataConfig(root=str(tmp_path)))


def test_training_refuses_suspect_labels_and_logs_why(tmp_path):
    f = tmp_path / "posts.csv"
    f.write_text("text,label\n" + "".join(f"post {i},{y}\n" for i, y in enumerate(_labelled(60, typo_at=7))))
    cfg = load_config(None, ["data.name=csv", f"data.root={f}", "model.name=text-only", "run.quiet=true"])
    with pytest.raises(DataError, match="neutrall"):
        Trainer(cfg, tmp_path / "run").fit()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "ERROR run stopped:" in log and "'neutrall': 1 post(s)" in log


# ------------------------------------------------------------------------------------------------ encodings
def test_non_utf8_bytes_name_file_line_and_offset(tmp_path):
    good = '{"text": "fine", "label": "positive"}\n'
    bad = '{"text": "caf\xe9 au lait", "label": "negative"}\n'.encode("cp1252")
    f = tmp_path / "posts.jsonl"
    f.write_bytes(good.encode() * 2 + bad)
    offset = 2 * len(good.encode()) + bad.index(b"\xe9")
    with pytest.raises(DataError, match=rf"posts\.jsonl:3: not utf-8 text: byte 0xe9 at byte offset {offset} "
                                        rf"\(column 14\).*data\.encoding"):
        build_jsonl(UserDataConfig(root=str(f), label_names=LABELS))
    b = build_jsonl(UserDataConfig(root=str(f), label_names=LABELS, encoding="cp1252"))
    assert b.splits["train"][2].text == "café au lait"

    c = tmp_path / "posts.csv"
    c.write_bytes(b"text,label\nok,positive\n" + "caf\xe9,negative\n".encode("latin-1"))
    r = run_cli("data", "check", "csv", "--root", str(c), "--set", "data.label_names=[negative,neutral,positive]")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"mmsenti: error: {c}:3: not utf-8 text: byte 0xe9 at byte offset 26 (column 4); "
                                "if the file uses another encoding, say which with data.encoding (e.g. cp1252 or "
                                "latin-1)")


def test_text_a_tokenizer_cannot_take_names_file_line_and_field(tmp_path):
    """A lone UTF-16 surrogate (legal JSON: \\ud800) passed `data check` and crashed training in the tokenizer."""
    f = tmp_path / "posts.jsonl"
    rows = [{"text": f"post {i}", "label": LABELS[i % 3]} for i in range(30)]
    rows[2]["text"] = "sun \ud800 rain"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes the escape: the file is ASCII
    line = r"posts\.jsonl:3: 'text' holds an unpaired UTF-16 surrogate \(U\+D800\) at character 4"
    with pytest.raises(DataError, match=line):
        build_jsonl(UserDataConfig(root=str(f), label_names=LABELS))
    r = run_cli("data", "check", "jsonl", "--root", str(f))
    assert r.returncode == 2 and re.fullmatch(f"mmsenti: error: .*{line}\n", r.stderr), r.stderr
    cfg = load_config(None, ["data.name=jsonl", f"data.root={f}", "model.name=text-only", "run.quiet=true"])
    with pytest.raises(DataError, match=line):
        Trainer(cfg, tmp_path / "run").fit()


def test_every_other_reader_refuses_such_text_too(tmp_path):
    from mmsenti.data.base import Sample
    from mmsenti.data.formats.bundle import finish
    from mmsenti.data.formats.hfm import parse_literal_line
    from mmsenti.data.formats.readers import read_json_list

    clmlf = tmp_path / "train.json"  # MVSA/HFM as CLMLF ships them, and translation.json
    clmlf.write_text(json.dumps([{"id": 1, "text": "ok", "emotion_label": 0},
                                 {"id": 2, "text": "\udfff", "emotion_label": 1}]))
    with pytest.raises(DataError, match=r"train\.json: item 1: 'text' holds an unpaired UTF-16 surrogate \(U\+DFFF\)"):
        read_json_list(clmlf)
    with pytest.raises(DataError, match=r"train\.txt:7: element 1 holds an unpaired UTF-16 surrogate \(U\+D83D\)"):
        parse_literal_line("['682716753374351360', 'so \\ud83d funny', 1]", tmp_path / "train.txt", 7)  # HFM raw
    # Texts from anywhere else (MMSA feature files, odd data.encoding values) are caught when the dataset is built.
    samples = {"train": [Sample(id="a", label=0, text="fine"), Sample(id="b", label=1, text="x\ud800")]}
    with pytest.raises(DataError, match=r"dataset 'mosi': train post 'b': the text holds an unpaired UTF-16 "
                                        r"surrogate \(U\+D800\) at character 1"):
        finish("mosi", samples, "classification", ["neg", "pos"], ("text",))


# ------------------------------------------------------------------------------------------------ images
def _image_posts(tmp_path: Path, n: int = 30) -> Path:
    """n posts with small PNGs; the first test post's image has a corrupt body."""
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(n):
        split = "test" if i >= n - 6 else ("dev" if i >= n - 12 else "train")
        noisy_png(tmp_path / "img" / f"{i}.png", seed=i, size=16)
        rows.append({"id": f"p{i}", "text": f"post {i}", "image": f"img/{i}.png", "label": LABELS[i % 3],
                     "split": split})
    corrupt_body_png(tmp_path / "img" / f"{n - 6}.png")
    f = tmp_path / "posts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.mark.parametrize("policy", ["error", "drop", "blank"])
def test_unreadable_test_image_follows_the_policy(tmp_path, policy, caplog):
    f = _image_posts(tmp_path)
    cfg = UserDataConfig(root=str(f), label_names=LABELS, missing_images=policy)
    if policy == "error":
        with pytest.raises(DataError, match=r"1 of 30 images missing or unusable \(unreadable 1\) .*first ids: p24 "
                                            r"\(unreadable\).*missing_images=drop"):
            build_jsonl(cfg)
        return
    with caplog.at_level(logging.WARNING):
        b = build_jsonl(cfg)
    test = {s.id: s for s in b.splits["test"]}
    if policy == "drop":
        assert sorted(test) == [f"p{i}" for i in range(25, 30)] and len(b.splits["train"]) == 18
        assert "dropped 1 post(s) whose image is missing or unusable (unreadable 1) (test 1" in caplog.text
    else:
        assert len(test) == 6 and test["p24"].image.getpixel((0, 0)) == BLANK_RGB
        assert test["p24"].extra["image_problem"] == "unreadable"
        assert "1 post(s) have no usable image file and get a blank image" in caplog.text


@pytest.mark.slow
def test_training_checks_every_split_before_the_first_epoch(tmp_path):
    """A bad test image stops the run before training (nothing lost); with drop the run completes without it."""
    f = _image_posts(tmp_path)
    sets = ["data.name=jsonl", f"data.root={f}", "data.label_names=[negative,neutral,positive]", "data.batch_size=8",
            "model.name=late-fusion-tiny", "optim.epochs=1", "run.quiet=true", "run.feature_cache=false"]
    with pytest.raises(DataError, match="p24 \\(unreadable\\)"):
        Trainer(load_config(None, sets), tmp_path / "stopped").fit()
    assert not (tmp_path / "stopped" / "checkpoints" / "last.pt").exists()
    assert "p24 (unreadable)" in (tmp_path / "stopped" / "train.log").read_text()
    results = Trainer(load_config(None, sets + ["data.missing_images=drop"]), tmp_path / "dropped").fit()
    assert np.sum(results["test"]["confusion_matrix"]) == 5
    # Checksums intact, pixel data garbage: passes the fast check, fails when the test split is scored at the end.
    # The run stops with the sample named, but the trained model is already saved.
    (tmp_path / "img" / "24.png").write_bytes(png(16, 16, b"garbage, not deflate"))
    with pytest.raises(DataError, match=r"sample p24: cannot read image"):
        Trainer(load_config(None, sets), tmp_path / "late").fit()
    assert (tmp_path / "late" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "late" / "metrics.json").exists()
    assert "sample p24: cannot read image" in (tmp_path / "late" / "train.log").read_text()


def test_decompression_bomb_is_refused_naming_sample_and_limit(tmp_path):
    b = bomb(tmp_path / "b.png")
    assert b.stat().st_size < 100_000
    assert inspect_image(b) == "too large"
    with pytest.raises(DataError, match=r"sample post7: image .*b\.png is too large \(225000000 pixels; the limit "
                                        r"is 89478485 pixels, data\.max_image_pixels\)"):
        open_image(b, "post7")
    Image.MAX_IMAGE_PIXELS = 200_000_000  # under it but over PIL's refusal threshold (2×): our check, with the size
    with pytest.raises(DataError, match=r"too large \(15000×15000 px; the limit is 200000000 pixels"):
        open_image(b, "post7")
    Image.MAX_IMAGE_PIXELS = 89_478_485
    f = tmp_path / "posts.jsonl"
    f.write_text("".join(json.dumps({"id": f"p{i}", "text": "t", "image": "b.png" if i == 3 else "ok.png",
                                     "label": LABELS[i % 3]}) + "\n" for i in range(9)))
    noisy_png(tmp_path / "ok.png")
    with pytest.raises(DataError, match=r"first ids: p3 \(too large: 225000000 pixels, over the limit of 89478485 "
                                        r"pixels \(data\.max_image_pixels\)\)"):
        build_jsonl(UserDataConfig(root=str(f), label_names=LABELS))
    with pytest.raises(DataError, match=r"first ids: p3 \(too large: 15000×15000 px, over the limit of 200000000 "):
        build_jsonl(UserDataConfig(root=str(f), label_names=LABELS, max_image_pixels=200_000_000))
    # A larger limit is the user's call: the header check passes it (nothing is decoded here).
    assert len(build_jsonl(UserDataConfig(root=str(f), label_names=LABELS,
                                          max_image_pixels=300_000_000)).splits["train"]) == 9
    Image.MAX_IMAGE_PIXELS = 89_478_485
    report = doctor.check(UserDataConfig(root=str(f), label_names=LABELS))
    assert report.splits["train"].images == {"too large": ["p3"]}
    assert any("over 89478485 pixels" in e for e in report.errors())


def test_data_check_decode_finds_what_the_header_check_cannot(tmp_path):
    f = tmp_path / "posts.jsonl"
    rows = [{"id": f"p{i}", "text": "t", "image": f"{i}.png", "label": LABELS[i % 3]} for i in range(6)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i in range(6):
        noisy_png(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "4.png").write_bytes(png(16, 16, b"garbage, not deflate"))
    sets = ["--set", "data.label_names=[negative,neutral,positive]"]
    r = run_cli("data", "check", "jsonl", "--root", str(f), *sets)
    assert r.returncode == 0 and "6 file(s) checked (header, size, end marker, PNG checksums)" in r.stdout
    r = run_cli("data", "check", "jsonl", "--root", str(f), *sets, "--decode")
    assert r.returncode == 1 and "6 file(s) checked (decoded)" in r.stdout
    assert re.search(r"ERROR   train: 1 (unreadable|truncated) image\(s\) \(first: p4\)", r.stdout)


# ------------------------------------------------------------------------------------------------ MMSA pickles
class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import shutil

        return (shutil.copyfile, (__file__, self.marker))


def _mmsa(n: int, start: int) -> dict:
    rng = np.random.default_rng(start)
    return {"id": np.array([f"v{start + i}$_${i}" for i in range(n)], dtype=object),
            "raw_text": [f"clip {start + i}" for i in range(n)],
            "audio": rng.normal(size=(n, 5, 3)).astype(np.float32), "vision": rng.normal(size=(n, 4, 2)),
            "audio_lengths": [5] * n, "vision_lengths": [4] * n, "regression_labels": np.linspace(-3, 3, n)}


def test_mmsa_pickle_is_converted_without_running_it(tmp_path):
    import pickle

    good = {"train": _mmsa(6, 0), "valid": _mmsa(3, 10), "test": _mmsa(3, 20)}
    (tmp_path / "unaligned_50.pkl").write_bytes(pickle.dumps(good))
    from mmsenti.data.formats.mmsa import MMSAConfig, build_mmsa, convert_pickle

    with pytest.raises(DataError, match=r"is a Python pickle.*mmsenti data convert"):
        build_mmsa(MMSAConfig(root=str(tmp_path)))
    r = run_cli("data", "convert", "mosi", "--root", str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "unaligned_50.npz")
    b = build_mmsa(MMSAConfig(root=str(tmp_path)))  # the .npz, no trust needed
    assert [s.id for s in b.splits["dev"]] == ["v10_0", "v11_1", "v12_2"]
    assert b.splits["train"][1].features["audio"].shape == (5, 3)

    marker = tmp_path / "pwned"
    bad = {"train": {**_mmsa(2, 0), "extra": _Payload(marker)}}
    (tmp_path / "crafted.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"crafted\.pkl: refused to convert: it references shutil\.copyfile, which is "
                                        r"not part of an MMSA feature file \(nothing in it was run\)"):
        convert_pickle(tmp_path / "crafted.pkl")
    assert not marker.exists() and not (tmp_path / "crafted.npz").exists()
