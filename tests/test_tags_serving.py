"""A post's tags wherever a post enters mmsenti, for a model whose image encoder is ``tags``: a user's JSONL/CSV files
(a list of strings, or one ``a|b|c`` cell), ``mmsenti predict --tags`` and ``--input`` rows, and the service (a
``tags`` list in a post, validated: a 422 naming ``posts[i].tags``). The same post is the same record everywhere;
a bad tags value is an error naming file:line (or the field) and the field."""

from __future__ import annotations

import asyncio
import csv
import json

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from serving_fixtures import TINY_INFIG, save_tiny_model  # noqa: E402

from mmsenti.cli import main  # noqa: E402
from mmsenti.data.base import MAX_TAG_CHARS, DataError, parse_tags  # noqa: E402
from mmsenti.data.formats.user import CsvDataConfig, UserDataConfig, build_csv, build_jsonl  # noqa: E402
from mmsenti.data.scenes import LABELS, make_sample  # noqa: E402
from mmsenti.inference import Prediction, load_model  # noqa: E402
from mmsenti.serve import ServeSettings, create_app  # noqa: E402

TAGS_MODEL = ["model.image_encoder.name=tags", "model.image_encoder.max_tags=6"]


def _posts(n: int, split: str = "test", seed: int = 7):
    return [make_sample(i, split, seed=seed, image_size=16, tags=True) for i in range(n)]


def _close(row: dict, ref: Prediction) -> None:
    """The same record: the same fields in the same order, the same label, probabilities within rounding."""
    assert list(row) == list(ref.to_dict()), (row, ref)
    assert row["id"] == ref.id and row["label"] == ref.label
    assert row["probabilities"] == pytest.approx(ref.probabilities, abs=2e-6)


@pytest.fixture(scope="module")
def model_dir(scenes_tags):
    return scenes_tags / "model"


@pytest.fixture(scope="module")
def predictor(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(model_dir, ServeSettings(api_key=None, max_post_tags=10))) as c:
        yield c


# ------------------------------------------------------------------------------- one record, every entry
def test_a_tags_post_is_the_same_record_from_python_the_command_line_and_the_service(model_dir, predictor, client,
                                                                                   tmp_path):
    """``load_model(...).predict(text, tags=...)``, ``mmsenti predict --input`` (JSONL with a list, CSV with an
    ``a|b`` cell) and ``POST /v1/predict`` (JSON and a multipart form) give each post the same Prediction."""
    posts = _posts(6)
    refs = [Prediction(**{**predictor.predict(s.text, tags=s.tags).to_dict(), "id": s.id}) for s in posts]
    assert len({r.label for r in refs}) > 1  # the posts are not all answered alike: the tags reach the model

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": s.id, "text": s.text, "tags": s.tags}) + "\n"
                                               for s in posts))
    with open(tmp_path / "in.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "tags"])
        w.writerows([s.id, s.text, "|".join(s.tags)] for s in posts)
    served = client.get("/v1/model").json()
    for name in ("in.jsonl", "in.csv"):
        out = tmp_path / f"{name}.out"
        assert main(["predict", str(model_dir), "--input", str(tmp_path / name), "--output", str(out),
                     "--quiet"]) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(rows) == len(posts)
        for row, ref in zip(rows, refs, strict=True):
            assert row.pop("model") == {"name": served["name"], "version": served["version"]}
            _close(row, ref)

    r = client.post("/v1/predict", json={"posts": [{"id": s.id, "text": s.text, "tags": s.tags} for s in posts]})
    assert r.status_code == 200, r.text
    for row, ref in zip(r.json()["predictions"], refs, strict=True):
        assert row.pop("modalities") == ["text", "image"]  # the model's image, read as tags
        _close(row, ref)
    s = posts[0]
    r = client.post("/v1/predict", data={"id": s.id, "text": s.text, "tags": "|".join(s.tags)})
    assert r.status_code == 200, r.text
    row = r.json()["predictions"][0]
    del row["modalities"]
    _close(row, refs[0])


def test_predict_tags_for_one_post(model_dir, predictor, capsys):
    text = "really hoping for sunny skies for the picnic, please, not a downpour"
    assert main(["predict", str(model_dir), "--text", text, "--tags", "tree | sunny|house"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = predictor.predict(text, tags=["tree", "sunny", "house"])
    assert got["label"] == ref.label == "positive"
    assert got["probabilities"] == pytest.approx(ref.probabilities, abs=2e-6)
    for argv, message in ((["--tags", "tree||sunny"], "--tags: item 1 is an empty tag"),
                          ([], "this model reads its image as tags (model.image_encoder.name=tags): give --tags"),
                          (["--tags", "x" * (MAX_TAG_CHARS + 1)], f"item 0 has {MAX_TAG_CHARS + 1} characters")):
        assert main(["predict", str(model_dir), "--text", text, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("mmsenti: error: ") and message in err, err


def test_a_bad_tags_row_is_an_error_row_naming_the_field_and_strict_names_file_and_line(model_dir, predictor,
                                                                                     tmp_path):
    posts = _posts(4)
    rows = [{"id": s.id, "text": s.text, "tags": s.tags} for s in posts]
    rows[1]["tags"] = ["sunny", 3]
    rows[2]["tags"] = "sunny|tree"  # a JSON line holds a list, not a CSV cell
    del rows[3]["tags"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(model_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                 "--quiet"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    got[0].pop("model")
    _close(got[0], Prediction(**{**predictor.predict(posts[0].text, tags=posts[0].tags).to_dict(), "id": "test-000000"}))
    assert [(g["id"], g.get("line"), g.get("error")) for g in got[1:]] == [
        ("test-000001", 2, "'tags': item 1 is int, not a string"),
        ("test-000002", 3, "'tags': must be a list of strings, got str"),
        ("test-000003", 4, "missing 'tags' (this model reads text and tags)")]
    assert main(["predict", str(model_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--quiet",
                 "--strict"]) == 2


def test_strict_prediction_names_the_file_and_line_of_a_bad_tags_cell(model_dir, tmp_path):
    from mmsenti.batch_predict import predict_file

    (tmp_path / "in.csv").write_text("id,text,tags\na,hoping for sun,sunny|tree\nb,hoping for rain,sunny||tree\n")
    with pytest.raises(DataError, match=r"in\.csv:3: 'tags': item 1 is an empty tag"):
        predict_file(load_model(model_dir), tmp_path / "in.csv", tmp_path / "out.jsonl", strict=True)


# ------------------------------------------------------------------------------------------- the service
def _bad_tags():
    return [
        ("too many tags", [f"t{i}" for i in range(11)], "11 tags, at most 10"),
        ("a 65-character tag", ["sunny", "x" * (MAX_TAG_CHARS + 1)], f"item 1 has {MAX_TAG_CHARS + 1} characters"),
        ("a number in the list", ["sunny", 5], "item 1 is int, not a string"),
        ("tags not a list", "sunny|tree", "must be a list of strings, got str"),
        ("an object", {"sunny": 1}, "must be a list of strings, got dict"),
        ("an empty tag", ["sunny", "  "], "item 1 is an empty tag"),
        ("no tags", None, "missing tags: this model reads text and tags"),
        ("an empty list", [], "missing tags: this model reads text and tags"),
    ]


@pytest.mark.parametrize("name, tags, message", _bad_tags(), ids=[c[0] for c in _bad_tags()])
def test_bad_tags_are_a_422_naming_the_field(client, name, tags, message):
    good = {"text": "hoping for sun", "tags": ["sunny", "tree"]}
    for body, field in (({**good, "tags": tags}, "tags"),
                        ({"posts": [good, {**good, "tags": tags}]}, "posts[1].tags")):
        r = client.post("/v1/predict", json=body)
        assert r.status_code == 422, (name, r.text)
        err = r.json()["error"]
        assert err["field"] == field and message in err["message"], (name, err)
    r = client.post("/v1/predict", data={"text": "hoping for sun", "tags": "sunny||tree"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "tags"


def test_a_post_with_bad_tags_fails_alone_and_the_other_clients_are_answered(model_dir, predictor):
    import httpx

    posts = _posts(8, seed=3)
    refs = predictor.predict_samples(posts)
    app = create_app(model_dir, ServeSettings(api_key=None, max_batch_size=32, max_wait_ms=20))
    good = [{"id": s.id, "text": s.text, "tags": s.tags} for s in posts]
    bad = {"posts": [*good[:2], {**good[0], "tags": ["sunny", "x" * 65]}]}

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await asyncio.gather(c.post("/v1/predict", json=bad),
                                            *[c.post("/v1/predict", json=g) for g in good])

    rs = asyncio.run(run())
    assert rs[0].status_code == 422 and rs[0].json()["error"]["field"] == "posts[2].tags"
    for r, ref in zip(rs[1:], refs, strict=True):
        assert r.status_code == 200, r.text
        row = r.json()["predictions"][0]
        del row["modalities"]
        _close(row, ref)


def test_the_card_and_the_openapi_schema_of_a_tags_model(client):
    card = client.get("/v1/model").json()
    assert card["backbones"] == {"text": "tiny-bert", "image": "tags (learned)"} and card["max_tags"] == 6
    assert card["modalities"] == ["text", "image"] and card["limits"]["max_post_tags"] == 10
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    post = schemas["Post"]
    assert post["required"] == ["text", "tags"] and schemas["PostForm"]["required"] == ["text", "tags"]
    assert post["properties"]["tags"] == {
        "type": "array", "minItems": 1, "maxItems": 10, "title": "Tags",
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_TAG_CHARS},
        "description": post["properties"]["tags"]["description"]}
    assert "max_tags" in post["properties"]["tags"]["description"]


def test_allow_missing_modality_takes_a_post_without_tags_as_one_without_its_image(tmp_path):
    """INFIG trained with modality dropout, its image as tags: a post without tags (absent or []) is answered from
    its text alone, as the Predictor answers it with the image hidden."""
    from mmsenti.data.base import Sample

    model_dir = save_tiny_model(tmp_path / "infig-tags", [*TINY_INFIG, *TAGS_MODEL])
    predictor = load_model(model_dir)
    predictor.allow_missing()
    s = _posts(1)[0]
    ref = predictor.predict_samples([Sample("a", None, s.text), Sample("b", None, s.text, tags=s.tags)])
    with TestClient(create_app(model_dir, ServeSettings(api_key=None, allow_missing_modality=True))) as c:
        r = c.post("/v1/predict", json={"posts": [{"id": "a", "text": s.text}, {"id": "b", "text": s.text,
                                                                                "tags": s.tags},
                                                  {"id": "a", "text": s.text, "tags": []}]})
        assert r.status_code == 200, r.text
        rows = r.json()["predictions"]
        assert [p.pop("modalities") for p in rows] == [["text"], ["text", "image"], ["text"]]
        for row, ref_row in zip(rows, [*ref, ref[0]], strict=True):
            _close(row, ref_row)
        assert rows[0]["probabilities"] != rows[1]["probabilities"]  # the tags reach the model
        post = c.get("/openapi.json").json()["components"]["schemas"]["Post"]
        assert [a["required"] for a in post["anyOf"]] == [["text"], ["tags"]]
        assert c.post("/v1/predict", json={"id": "x", "tags": []}).status_code == 422  # neither


# ------------------------------------------------------------------------------------- your own files
def _write(directory, fmt: str, posts, tags=lambda s: s.tags):
    """Scenes posts with tags as a user's file (JSON lines: a list; CSV: one ``a|b`` cell), with split and label."""
    path = directory / f"posts.{fmt}"
    rows = [{"id": s.id, "text": s.text, "tags": tags(s), "label": LABELS[s.label], "split": s.id.split("-")[0]}
            for s in posts]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({**r, "tags": "|".join(r["tags"]) if r["tags"] is not None else ""} for r in rows)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_users_file_with_tags_trains_a_tags_model(tmp_path, fmt, capsys):
    posts = _posts(24, "train") + _posts(8, "dev") + _posts(8, "test")
    path = _write(tmp_path, fmt, posts)
    build, cfg = (build_jsonl, UserDataConfig) if fmt == "jsonl" else (build_csv, CsvDataConfig)
    bundle = build(cfg(root=str(path), label_names=list(LABELS)))
    assert bundle.modalities == ("text", "tags")
    assert [s.tags for s in bundle.splits["dev"]] == [s.tags for s in posts[24:32]]
    assert "tags" not in bundle.splits["dev"][0].extra
    run = tmp_path / "run"
    argv = ["train", "--config", "configs/quickstart.yaml", "--out", str(run), "--quiet"]
    overrides = [f"data.name={fmt}", f"data.root={path}", "data.label_names=[negative,neutral,positive]",
                 "data.batch_size=8", "model.name=late-fusion-tiny", *TAGS_MODEL, "optim.epochs=1"]
    assert main(argv + [x for o in overrides for x in ("--set", o)]) == 0
    prep = json.loads((run / "model" / "preprocessing.json").read_text())
    assert [b["kind"] for b in prep["builders"]] == ["tokens", "tags"]
    s = posts[-1]
    assert load_model(run / "model").predict(s.text, tags=s.tags).label in LABELS

    # `mmsenti data check` and `data stats` count the posts' tags.
    data = [fmt, "--root", str(path), "--set", "data.label_names=[negative,neutral,positive]"]
    capsys.readouterr()
    assert main(["data", "stats", *data]) == 0
    assert "tags/post  min 2" in capsys.readouterr().out
    _write(tmp_path, fmt, posts, tags=lambda s: None if s.id == "dev-000003" else s.tags)
    assert main(["data", "check", *data]) == 0  # a warning
    assert "dev: 1 post(s) without tags" in capsys.readouterr().out
    bundle = build(cfg(root=str(path), label_names=list(LABELS)))
    assert bundle.splits["dev"][3].tags is None  # the tags builder names it when a tags model reads it


@pytest.mark.parametrize("fmt, tags, message", [
    ("jsonl", "sunny|tree", "tags: must be a list of strings, got str"),
    ("jsonl", ["sunny", 3], "tags: item 1 is int, not a string"),
    ("jsonl", ["sunny", ""], "tags: item 1 is an empty tag"),
    ("jsonl", ["x" * (MAX_TAG_CHARS + 1)], f"tags: item 0 has {MAX_TAG_CHARS + 1} characters, at most {MAX_TAG_CHARS}"),
    ("csv", "sunny||tree", "tags: item 1 is an empty tag"),
    ("csv", "sunny|" + "x" * (MAX_TAG_CHARS + 1), f"tags: item 1 has {MAX_TAG_CHARS + 1} characters"),
])
def test_a_bad_tags_value_in_a_users_file_names_file_line_and_field(tmp_path, fmt, tags, message):
    posts = _posts(4, "train")
    path = _write(tmp_path, fmt, posts)
    lines = path.read_text().splitlines()
    bad = {"text": "x", "tags": tags, "label": "positive"}
    if fmt == "jsonl":
        lines[2] = json.dumps(bad)  # line 3
    else:
        lines[2] = f"x,x,{tags},positive,train"  # line 3 (line 1 is the header)
    path.write_text("\n".join(lines) + "\n")
    build, cfg = (build_jsonl, UserDataConfig) if fmt == "jsonl" else (build_csv, CsvDataConfig)
    with pytest.raises(DataError) as e:
        build(cfg(root=str(path), label_names=list(LABELS)))
    assert str(e.value).startswith(f"{path}:3: {message}")


def test_parse_tags_reads_lists_and_cells_alike():
    assert parse_tags(["sunny", "clear sky"]) == parse_tags(" sunny | clear sky ", cell=True) == ["sunny", "clear sky"]
    assert parse_tags(None) is None and parse_tags("", cell=True) is None and parse_tags([]) == []
    with pytest.raises(DataError, match="3 tags, at most 2"):
        parse_tags(["a", "b", "c"], max_count=2)
    with pytest.raises(DataError, match="item 0 holds an unpaired UTF-16 surrogate"):
        parse_tags(["sun \ud800"])
