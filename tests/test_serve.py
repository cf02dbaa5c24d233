"""The REST service: answers equal the Predictor's, errors are 4xx naming the field (a table of malformed
requests, after which a valid request still answers correctly), API key, missing modality, micro-batching."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from serving_fixtures import TINY_INFIG, save_tiny_model  # noqa: E402

from mmsenti.data.scenes import make_sample  # noqa: E402
from mmsenti.inference import load_model  # noqa: E402
from mmsenti.serve import ServeSettings, create_app  # noqa: E402

LIMITS = dict(max_body_bytes=600_000, max_image_bytes=200_000, max_image_pixels=1_000_000, max_text_chars=1000,
              max_posts=8, api_key=None)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its data is a few bytes): a decompression bomb's header."""
    data = png_bytes(Image.new("RGB", (4, 4)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def predictor(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(model_dir, ServeSettings(**LIMITS))) as c:
        yield c


@pytest.fixture(scope="module")
def post():
    s = make_sample(3, "test", seed=5, image_size=48)
    return s.text, s.image


def _expect_same(row, ref):
    assert row["label"] == ref["label"]
    assert row["probabilities"] == pytest.approx(ref["probabilities"], abs=2e-6)


def test_one_post_a_list_and_multipart_answer_as_the_predictor(client, predictor, post, model_dir):
    text, image = post
    ref = predictor.predict(text, image=image)
    r = client.post("/v1/predict", json={"text": text, "image": b64(png_bytes(image))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == model_dir.name and len(body["model"]["version"]) == 12
    _expect_same(body["predictions"][0], ref)
    assert body["predictions"][0]["modalities"] == ["text", "image"] and body["predictions"][0]["id"] == "0"

    others = [make_sample(i, "dev", seed=1, image_size=40) for i in range(5)]
    refs = predictor.predict_samples(others)
    r = client.post("/v1/predict", json={"posts": [{"id": s.id, "text": s.text, "image": b64(png_bytes(s.image))}
                                                   for s in others]})
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    assert [p["id"] for p in rows] == [s.id for s in others]
    for row, ref_row in zip(rows, refs, strict=True):
        _expect_same(row, ref_row)

    # JPEG through multipart (and as a data URL in JSON): both decode the same file.
    jpeg = png_bytes(image, "JPEG")
    ref_jpeg = predictor.predict(text, image=Image.open(io.BytesIO(jpeg)))
    r = client.post("/v1/predict", data={"text": text, "id": "m"}, files={"image": ("a.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text
    _expect_same(r.json()["predictions"][0], ref_jpeg)
    r = client.post("/v1/predict", json={"text": text, "image": "data:image/jpeg;base64," + b64(jpeg)})
    _expect_same(r.json()["predictions"][0], ref_jpeg)


def test_health_model_card_and_docs(client, model_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    card = client.get("/v1/model").json()
    assert card["task"] == "classification" and card["labels"] == ["negative", "neutral", "positive"]
    assert card["modalities"] == ["text", "image"] and card["model"] == "late-fusion"
    assert card["backbones"] == {"text": "tiny-bert", "image": "small-cnn"} and card["dataset"] == "scenes"
    assert card["limits"]["max_posts"] == 8
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    assert {"Post", "PostBatch", "PredictResponse"} <= set(spec["components"]["schemas"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="post-form"' in page.text
    assert "registerPanel" in client.get("/static/app.js").text


def _malformed(image: Image.Image):
    ok = b64(png_bytes(image))
    good = {"text": "hoping for sun", "image": ok}
    tiff = b64(png_bytes(image, "TIFF"))
    truncated = b64(png_bytes(image)[:200])
    big = b64(png_bytes(Image.effect_noise((300, 300), 80).convert("RGB")))  # > 200 kB of noise
    j = lambda body: {"json": body}  # noqa: E731
    raw = lambda content, ctype: {"content": content, "headers": {"content-type": ctype}}  # noqa: E731
    files = lambda **kw: {"files": kw}  # noqa: E731
    return [
        ("invalid JSON", raw(b"{not json", "application/json"), 400, "body"),
        ("empty body", raw(b"", "application/json"), 400, "body"),
        ("invalid UTF-8", raw(b'{"text": "\xff\xfe"}', "application/json"), 400, "body"),
        ("a JSON array", j([1, 2]), 422, "body"),
        ("a JSON string", j("hello"), 422, "body"),
        ("an empty post", j({}), 422, "body"),
        ("nulls only", j({"text": None, "image": None}), 422, "body"),
        ("text is a number", j({**good, "text": 5}), 422, "text"),
        ("text is a list", j({**good, "text": ["a"]}), 422, "text"),
        ("id is a number", j({**good, "id": 5}), 422, "id"),
        ("id too long", j({**good, "id": "x" * 300}), 422, "id"),
        ("unknown field", j({**good, "txt": "hi"}), 422, "txt"),
        ("missing image", j({"text": "hi"}), 422, "image"),
        ("missing text", j({"image": ok}), 422, "text"),
        ("image is a number", j({**good, "image": 5}), 422, "image"),
        ("image not base64", j({**good, "image": "!!! not base64 !!!"}), 422, "image"),
        ("image bytes are not an image", j({**good, "image": b64(b"hello world" * 10)}), 422, "image"),
        ("truncated PNG", j({**good, "image": truncated}), 422, "image"),
        ("format not allowed (TIFF)", j({**good, "image": tiff}), 422, "image"),
        ("image over the byte limit", j({**good, "image": big}), 413, "image"),
        ("decompression bomb header", j({**good, "image": b64(bomb_png(20000, 20000))}), 413, "image"),
        ("text over the length limit", j({**good, "text": "a" * 1001}), 422, "text"),
        ("posts empty", j({"posts": []}), 422, "posts"),
        ("posts not a list", j({"posts": "x"}), 422, "posts"),
        ("posts[1] wrong type", j({"posts": [good, {**good, "text": 3}]}), 422, "posts[1].text"),
        ("posts[0] missing image", j({"posts": [{"text": "hi"}]}), 422, "posts[0].image"),
        ("posts[0] unknown field", j({"posts": [{**good, "extra": 1}]}), 422, "posts[0].extra"),
        ("posts[2] bad base64", j({"posts": [good, good, {**good, "image": "%%%"}]}), 422, "posts[2].image"),
        ("too many posts", j({"posts": [good] * 9}), 413, "posts"),
        ("body over the limit", raw(b'{"text": "' + b"a" * 700_000 + b'"}', "application/json"), 413, "body"),
        ("text/plain", raw(b"hello", "text/plain"), 415, "content-type"),
        ("no content type", raw(b"hello", ""), 415, "content-type"),
        ("multipart without image", {"data": {"text": "hi"}, "files": {"x": ("", b"")}}, 422, "x"),
        ("multipart text only", {"data": {"text": "hi", "id": "1"}, **files(image=("a.png", b"", "image/png"))},
         422, "image"),
        ("multipart image as a field", {"data": {"text": "hi", "image": "abc"},
                                        **files(other=("a.png", b"1", "image/png"))}, 422, "other"),
        ("multipart image not a file", {"data": {"text": "hi", "image": ok}}, 422, "image"),
        ("multipart corrupt image", {"data": {"text": "hi"}, **files(image=("a.png", b"garbage", "image/png"))},
         422, "image"),
        ("multipart without parts", raw(b"--xyz\r\nnonsense", "multipart/form-data; boundary=xyz"), 422, "body"),
        ("multipart without boundary", raw(b"--xyz\r\nnonsense", "multipart/form-data"), 400, "body"),
    ]


def test_malformed_requests_get_a_4xx_naming_the_field_and_the_server_keeps_answering(client, predictor, post):
    text, image = post
    cases = _malformed(image)
    assert len(cases) >= 30
    for name, kwargs, status, field in cases:
        r = client.post("/v1/predict", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["status"] == status and err["field"] == field and err["message"], (name, err)
    assert client.get("/v1/predict").status_code == 405
    r = client.post("/v1/nothing", json={})
    assert r.status_code == 404 and r.json()["error"]["status"] == 404
    # Still alive and still right.
    r = client.post("/v1/predict", json={"text": text, "image": b64(png_bytes(image))})
    assert r.status_code == 200
    _expect_same(r.json()["predictions"][0], predictor.predict(text, image=image))
    assert client.get("/readyz").status_code == 200


def test_api_key_guards_every_v1_route(model_dir, post, monkeypatch):
    text, image = post
    monkeypatch.setenv("MMSENTI_API_KEY", "s3cret")
    with TestClient(create_app(model_dir)) as c:  # the key from the environment
        body = {"text": text, "image": b64(png_bytes(image))}
        for path, method in (("/v1/model", "get"), ("/v1/predict", "post")):
            kw = {"json": body} if method == "post" else {}
            r = getattr(c, method)(path, **kw)
            assert r.status_code == 401 and r.json()["error"]["field"] == "X-API-Key"
            assert getattr(c, method)(path, headers={"X-API-Key": "wrong"}, **kw).status_code == 401
            assert getattr(c, method)(path, headers={"X-API-Key": "s3cret"}, **kw).status_code == 200
            assert getattr(c, method)(path, headers={"Authorization": "Bearer s3cret"}, **kw).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_missing_modality_is_an_error_unless_allowed(tmp_path, post):
    text, image = post
    infig_dir = save_tiny_model(tmp_path / "infig", TINY_INFIG)
    with TestClient(create_app(infig_dir, ServeSettings(api_key=None))) as c:
        r = c.post("/v1/predict", json={"text": text})
        assert r.status_code == 422 and r.json()["error"]["field"] == "image"
        assert "--allow-missing-modality" in r.json()["error"]["message"]
    predictor = load_model(infig_dir)
    predictor.allow_missing()
    from mmsenti.data.base import Sample

    ref = predictor.predict_samples([Sample("a", None, text, None), Sample("b", None, None, image),
                                     Sample("c", None, text, image)])
    with TestClient(create_app(infig_dir, ServeSettings(api_key=None, allow_missing_modality=True))) as c:
        r = c.post("/v1/predict", json={"posts": [{"id": "a", "text": text}, {"id": "b", "image": b64(png_bytes(image))},
                                                  {"id": "c", "text": text, "image": b64(png_bytes(image))}]})
        assert r.status_code == 200, r.text
        rows = r.json()["predictions"]
        assert [p["modalities"] for p in rows] == [["text"], ["image"], ["text", "image"]]
        for row, ref_row in zip(rows, ref, strict=True):
            _expect_same(row, ref_row)
        # Hiding a modality changes the answer (the mask reaches the model).
        assert rows[0]["probabilities"] != rows[2]["probabilities"]
        assert c.post("/v1/predict", json={"id": "x"}).status_code == 422  # neither modality
    # A model that cannot hide a modality refuses the option when it starts.
    lf = save_tiny_model(tmp_path / "lf")
    with pytest.raises(ValueError, match="cannot predict from a post that lacks"):
        with TestClient(create_app(lf, ServeSettings(allow_missing_modality=True))):
            pass


def test_concurrent_requests_are_batched_and_answered_in_order(model_dir, predictor):
    import httpx

    samples = [make_sample(i, "dev", seed=3, image_size=40) for i in range(24)]
    refs = predictor.predict_samples(samples)
    app = create_app(model_dir, ServeSettings(api_key=None, max_batch_size=8, max_wait_ms=20))

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                rs = await asyncio.gather(*[
                    c.post("/v1/predict", json={"id": s.id, "text": s.text, "image": b64(png_bytes(s.image))})
                    for s in samples])
            return rs, app.state.service.batcher

    rs, batcher = asyncio.run(main())
    assert all(r.status_code == 200 for r in rs)
    for r, s, ref in zip(rs, samples, refs, strict=True):
        row = r.json()["predictions"][0]
        assert row["id"] == s.id
        _expect_same(row, ref)
    assert batcher.batches < len(samples) and max(batcher.batch_sizes) > 1 and max(batcher.batch_sizes) <= 8
