"""The REST service: answers equal the Predictor's, errors are 4xx naming the field (a table of malformed
requests, after which a valid request still answers correctly), API key, missing modality, micro-batching, the
OpenAPI schema; one model thread for predictions and explanations (they never mix), a failing model call that fails
only its own posts, and models whose answers depend on their batch refused by every per-post command. One
prediction type for Python, the command line and the service; the settings and their flags written once."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import struct
import threading
import zlib

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from serving_fixtures import TINY_INFIG, TINY_RAHP_IN_BATCH, save_tiny_model, write_posts  # noqa: E402

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


def json_bytes(body) -> bytes:
    """JSON as a client sends it, escapes included (httpx's own encoder cannot send a lone surrogate)."""
    return json.dumps(body).encode()


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
        ("a lone surrogate in the text", raw(json_bytes({**good, "text": "sun \ud800"}), "application/json"),
         422, "text"),
        ("a lone surrogate in posts[2].text", raw(json_bytes({"posts": [good, good, {**good, "text": "\udcff"}]}),
                                                  "application/json"), 422, "posts[2].text"),
        ("a lone surrogate in the id", raw(json_bytes({**good, "id": "\ud800"}), "application/json"), 422, "id"),
        ("100,000 nested arrays", raw(b"[" * 100_000, "application/json"), 400, "body"),
        ("a text nested 100,000 deep", raw(b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
         400, "body"),
        ("a 1x6000 image (too thin)", j({**good, "image": b64(png_bytes(Image.new("RGB", (1, 6000))))}), 422, "image"),
        ("a 6000x100 image (aspect 60:1)", j({**good, "image": b64(png_bytes(Image.new("RGB", (6000, 100))))}), 422,
         "image"),
        ("a 4x4 image (a side under 8)", j({**good, "image": b64(png_bytes(Image.new("RGB", (4, 4))))}), 422, "image"),
        ("JSON sent as a URL-encoded form", raw(json_bytes(good), "application/x-www-form-urlencoded"), 415,
         "content-type"),
        ("multipart id too long", {"data": {"text": "hi", "id": "x" * 300}, **files(image=("a.png", b"1", "image/png"))},
         422, "id"),
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
    r = client.get("/v1/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST"  # RFC 9110: a 405 says what is allowed
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


# ------------------------------------------------------------------------------------- the OpenAPI schema
def test_openapi_schema_says_what_a_post_needs(client, tmp_path):
    """The schema requires what the server requires: ``{}`` and all-null posts are invalid in it, not only at the
    server (schemathesis found the gap)."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    post, form = schemas["Post"], schemas["PostForm"]
    assert post["required"] == ["text", "image"] and form["required"] == ["text", "image"]
    assert post["properties"]["text"] == {"type": "string", "minLength": 1, "maxLength": LIMITS["max_text_chars"],
                                          "title": "Text", "description": "the post's text"}
    assert post["properties"]["image"]["type"] == "string" and "anyOf" not in post["properties"]["image"]
    assert post["additionalProperties"] is False
    assert schemas["PostBatch"]["properties"]["posts"]["maxItems"] == LIMITS["max_posts"]
    body = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"] == {"$ref": "#/components/schemas/PostForm"}
    # A server that accepts a missing modality: either one, but at least one, as a non-empty string.
    infig_dir = save_tiny_model(tmp_path / "infig", TINY_INFIG)
    with TestClient(create_app(infig_dir, ServeSettings(api_key=None, allow_missing_modality=True))) as c:
        post = c.get("/openapi.json").json()["components"]["schemas"]["Post"]
    assert "required" not in post
    assert post["anyOf"] == [{"required": ["text"], "properties": {"text": {"type": "string", "minLength": 1,
                                                                           "maxLength": 5000}}},
                             {"required": ["image"], "properties": {"image": {"type": "string", "minLength": 1}}}]


# -------------------------------------------------------------------------- one thread owns the model
@pytest.fixture(scope="module")
def infig_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("infig"), TINY_INFIG)


def _close(got, ref, path="explanation"):
    """Equal JSON, floats within 2e-6 (their rounding quantum is 1e-6)."""
    if isinstance(ref, dict):
        assert isinstance(got, dict) and got.keys() == ref.keys(), path
        for k in ref:
            _close(got[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, list):
        assert isinstance(got, list) and len(got) == len(ref), path
        for i, (g, r) in enumerate(zip(got, ref, strict=True)):
            _close(g, r, f"{path}[{i}]")
    elif isinstance(ref, float):
        assert got == pytest.approx(ref, abs=2e-6), path
    else:
        assert got == ref, path


def test_explanations_and_predictions_share_one_model_thread_and_never_mix(infig_dir):
    """Explanations (Captum hooks on the embedding layer, dozens of passes) run while a stream of predictions is
    served: every model call runs on the model's thread, every prediction equals its post's answer alone, every
    explanation equals the one computed alone. (Before: explanations ran the same model in another thread, and
    predictions failed with shape errors or came back wrong.)"""
    import httpx

    predictor = load_model(infig_dir)
    posts = [make_sample(i, "dev", seed=3, image_size=40) for i in range(12)]
    alone = [predictor.predict_samples([s])[0] for s in posts]
    explained = posts[:3]
    ref_ex = [predictor.explain(s.text, s.image, ig_steps=8).to_dict() for s in explained]

    threads = []  # the thread of every forward pass the service runs
    forward = predictor.model.forward

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return forward(*args, **kwargs)

    predictor.model.forward = recorded
    app = create_app(infig_dir, ServeSettings(api_key=None, max_batch_size=4, max_wait_ms=1), predictor=predictor)

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as c:
                explanations = asyncio.gather(*[
                    c.post("/v1/explain?ig_steps=8&figures=word_regions", json={"id": s.id, "text": s.text,
                                                                                "image": b64(png_bytes(s.image))})
                    for s in explained])
                answers = []

                async def stream(start: int):  # one client posting one post after another until the end
                    i = start
                    while not explanations.done() or i == start:
                        s = posts[i % len(posts)]
                        r = await c.post("/v1/predict", json={"id": s.id, "text": s.text,
                                                               "image": b64(png_bytes(s.image))})
                        answers.append((i % len(posts), r))
                        i += 3

                await asyncio.gather(*[stream(k) for k in range(3)])
                return await explanations, answers

    exs, answers = asyncio.run(main())
    assert threads and set(threads) == {"mmsenti-model_0"}, sorted(set(threads))
    for r, s, ref in zip(exs, explained, ref_ex, strict=True):
        assert r.status_code == 200, r.text
        got = r.json()["explanation"]
        assert got["id"] == s.id
        _close({**got, "id": ref["id"]}, ref)
        assert r.json()["figures"]["word_regions"].startswith("data:image/png;base64,")
    assert len(answers) >= 3
    for i, r in answers:
        assert r.status_code == 200, r.text
        _expect_same(r.json()["predictions"][0], alone[i])


# -------------------------------------------------------------------------------- batcher fault isolation
def test_the_batcher_retries_a_failed_batch_post_by_post():
    """A batch call that raises, or returns the wrong number of results, is retried one post at a time: only the
    bad post fails, and the batcher goes on."""
    from mmsenti.serve.batching import MicroBatcher

    calls = []

    def fn(items):
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("model failed")
        out = [f"ok:{x}" for x in items]
        return out[:-1] if "short" in items else out  # a wrong-length answer

    async def main():
        b = MicroBatcher(fn, max_batch_size=8, max_wait_ms=1)
        await b.start()
        try:
            rs = await asyncio.wait_for(asyncio.gather(*[b.submit([x]) for x in ("a", "boom", "b", "short", "c")],
                                                       return_exceptions=True), 60)  # a hang guard, not a timing
            after = await asyncio.wait_for(b.submit(["d", "e"]), 60)
            return rs, after, b.running, b.failed_calls
        finally:
            await b.stop()

    rs, after, running, failed = asyncio.run(main())
    assert calls[0] == ["a", "boom", "b", "short", "c"]  # tried as one batch first
    assert calls[1:6] == [["a"], ["boom"], ["b"], ["short"], ["c"]]  # then one by one
    assert rs[0] == ["ok:a"] and rs[2] == ["ok:b"] and rs[4] == ["ok:c"]
    assert isinstance(rs[1], RuntimeError) and "model failed" in str(rs[1])
    assert isinstance(rs[3], RuntimeError) and "returned 0 results for a batch of 1" in str(rs[3])
    assert after == ["ok:d", "ok:e"] and running and failed == 3


def test_a_failing_model_call_is_a_500_with_a_request_id_for_its_own_request_only(model_dir, predictor, caplog):
    """Through the app, with a fault injected into the model call: the bad requests get a 500 whose request id is in
    the log, their batch-mates their right answers, and the service keeps answering."""
    import httpx

    samples = [make_sample(i, "dev", seed=4, image_size=40) for i in range(6)]
    refs = predictor.predict_samples(samples)
    app = create_app(model_dir, ServeSettings(api_key=None, max_batch_size=8, max_wait_ms=20))

    async def main():
        async with app.router.lifespan_context(app):
            service = app.state.service
            model_call = service.batcher.fn

            def faulty(posts):
                if any(p.id == "boom" for p in posts):
                    raise RuntimeError("injected model fault")
                rows = model_call(posts)
                return rows[:-1] if any(p.id == "short" for p in posts) else rows

            service.batcher.fn = faulty
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                ids = [s.id for s in samples[:2]] + ["boom"] + [s.id for s in samples[2:4]] + ["short"]
                posts = samples[:2] + [samples[0]] + samples[2:4] + [samples[0]]
                rs = await asyncio.wait_for(asyncio.gather(*[
                    c.post("/v1/predict", json={"id": i, "text": s.text, "image": b64(png_bytes(s.image))})
                    for i, s in zip(ids, posts, strict=True)]), 120)  # a hang guard, not a timing
                s = samples[5]
                after = await c.post("/v1/predict", json={"id": s.id, "text": s.text, "image": b64(png_bytes(s.image))})
                ready = await c.get("/readyz")
            return ids, rs, after, ready

    with caplog.at_level(logging.ERROR, logger="mmsenti.serve"):
        ids, rs, after, ready = asyncio.run(main())
    by_id = {s.id: ref for s, ref in zip(samples, refs, strict=True)}
    for i, r in zip(ids, rs, strict=True):
        if i in ("boom", "short"):
            assert r.status_code == 500, r.text
            rid = r.headers["x-request-id"]
            assert r.json()["error"]["message"].startswith(f"internal error (request {rid}")
            assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records), rid
        else:
            assert r.status_code == 200, r.text
            _expect_same(r.json()["predictions"][0], by_id[i])
    assert after.status_code == 200 and ready.status_code == 200
    _expect_same(after.json()["predictions"][0], by_id[samples[5].id])



def test_a_user_error_in_a_request_is_a_422_with_its_message(client, post):
    """Every UserError a request meets (here a DataError from the model call) is answered in one place, as a 4xx."""
    from mmsenti.errors import DataError

    text, image = post
    batcher = client.app.state.service.batcher
    model_call = batcher.fn

    def refuse(posts):
        raise DataError("sample 0: cannot read image x.png")

    batcher.fn = refuse
    try:
        r = client.post("/v1/predict", json={"text": text, "image": b64(png_bytes(image))})
    finally:
        batcher.fn = model_call
    assert r.status_code == 422, r.text
    assert r.json() == {"error": {"status": 422, "field": None, "message": "sample 0: cannot read image x.png"}}

# ----------------------------------------------------------------------------- one bad post, many clients
def test_a_lone_surrogate_is_a_422_and_the_other_clients_are_answered(model_dir, predictor):
    """``"\\ud800"`` is legal JSON but no tokenizer takes it: a 422 naming ``posts[3].text``, while 15 other
    clients' concurrent requests are answered right (before: a 500 for it and most of its batch-mates)."""
    import httpx

    samples = [make_sample(i, "test", seed=6, image_size=40) for i in range(16)]
    refs = predictor.predict_samples(samples)
    app = create_app(model_dir, ServeSettings(api_key=None, max_batch_size=32, max_wait_ms=20))
    good = [{"id": s.id, "text": s.text, "image": b64(png_bytes(s.image))} for s in samples]
    bad = {"posts": [*good[:3], {**good[0], "text": "sunny \ud800 day"}]}

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await asyncio.gather(
                    c.post("/v1/predict", content=json_bytes(bad), headers={"content-type": "application/json"}),
                    *[c.post("/v1/predict", json=g) for g in good])

    rs = asyncio.run(main())
    assert rs[0].status_code == 422 and rs[0].json()["error"]["field"] == "posts[3].text"
    assert "surrogate" in rs[0].json()["error"]["message"]
    for r, ref in zip(rs[1:], refs, strict=True):
        assert r.status_code == 200, r.text
        _expect_same(r.json()["predictions"][0], ref)
    # In Python too: a clear error naming the post, not the tokenizer's.
    from mmsenti.data.base import DataError

    with pytest.raises(DataError, match="post 0: its text holds an unpaired UTF-16 surrogate"):
        predictor.predict("sun \ud800", image=samples[0].image)


# ------------------------------------------------------------------------------------ thin images, explain
def test_a_thin_image_is_refused_by_explain_quickly(client, post):
    """A 1x6000 PNG once sized an explanation figure 12,000 inches tall (24 GB); now a 422 naming the image."""
    text, _ = post
    thin = b64(png_bytes(Image.new("RGB", (1, 6000), (200, 30, 30))))
    r = client.post("/v1/explain?figures=word_regions", json={"text": text, "image": thin})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "image" and "1x6000" in err["message"] and "aspect" not in err["message"]
    assert client.get("/v1/model").json()["limits"]["max_image_aspect"] == 20.0


# ------------------------------------------------------------- batch-dependent models: refused everywhere
@pytest.fixture(scope="module")
def in_batch_rahp(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("rahp-in-batch"), TINY_RAHP_IN_BATCH)


@pytest.mark.parametrize("command, what", [
    (["serve"], "served"),
    (["predict", "--text", "hoping for sun", "--image", "{image}"], "used for prediction"),
    (["predict", "--input", "{dir}/posts.jsonl"], "used for prediction"),
    (["explain", "--text", "hoping for sun", "--image", "{image}", "--out", "{dir}/out"], "explained"),
])
def test_a_model_whose_answer_depends_on_its_batch_is_refused(in_batch_rahp, tmp_path, capsys, monkeypatch, command,
                                                               what):
    """RAHP with retrieval: in-batch retrieves among a post's batch-mates: serving (other clients' posts),
    prediction (rows regrouped by length) and explanation (a batch of interpolated copies) refuse it in one line,
    as export does (one check: mmsenti.models.base.check_per_post)."""
    import uvicorn

    from mmsenti.cli import main

    def serving(*args, **kwargs):  # a server that starts would never return
        raise AssertionError("mmsenti serve started serving a batch-dependent model")

    monkeypatch.setattr(uvicorn, "run", serving)

    _, samples = write_posts(tmp_path, 2)
    image = tmp_path / f"{samples[0].id}.png"
    argv = [command[0], str(in_batch_rahp), *[a.format(dir=tmp_path, image=image) for a in command[1:]]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"mmsenti: error: rahp with model.retrieval=in-batch cannot be {what}: its neighbours are the "
                       "other posts of the batch a post is predicted in, so its answer depends on that batch; train "
                       "with model.retrieval=bank (a memory bank saved with the model) or none")
    assert not (tmp_path / "out").exists()
    if command[0] == "serve":  # the app itself, started from Python
        with pytest.raises(ValueError, match="cannot be served"):
            with TestClient(create_app(in_batch_rahp, ServeSettings(api_key=None))):
                pass


# --------------------------------------------------------------------------- one prediction type, one settings list
def test_a_post_is_the_same_record_from_python_the_command_line_and_the_service(model_dir, client, tmp_path):
    """``load_model(...).predict``, ``mmsenti predict --input`` and ``POST /v1/predict`` write one Prediction: the
    same fields in the same order with the same values. Beside it, the file's row names the model as the service's
    answer does, and the service says which modalities the post had."""
    from mmsenti.cli import main
    from mmsenti.inference import Prediction

    _, samples = write_posts(tmp_path, 1)
    s, image = samples[0], tmp_path / f"{samples[0].id}.png"
    (tmp_path / "one.jsonl").write_text(json.dumps({"id": "0", "text": s.text, "image": image.name}) + "\n")
    python = load_model(model_dir).predict(s.text, image=str(image))  # its id: "0"
    assert main(["predict", str(model_dir), "--input", str(tmp_path / "one.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--quiet"]) == 0
    row = json.loads((tmp_path / "out.jsonl").read_text())
    r = client.post("/v1/predict", json={"id": "0", "text": s.text, "image": b64(image.read_bytes())})
    assert r.status_code == 200, r.text
    served = r.json()["predictions"][0]

    assert row.pop("model") == r.json()["model"]
    assert served.pop("modalities") == ["text", "image"]
    assert list(row) == list(served) == list(python.to_dict()) == ["id", "label", "probabilities"]
    assert Prediction(**row) == Prediction(**served) == python
    # It still reads as the dict predictions were before they had a type.
    assert python["label"] == python.label and dict(python) == row and "score" not in python


def test_the_served_prediction_schema_is_the_prediction_type(client):
    """The response schema is derived from the Prediction dataclass: a field added to it is served and documented,
    never silently dropped by the response model."""
    from dataclasses import field, fields, make_dataclass

    from mmsenti.inference import Prediction
    from mmsenti.serve.schemas import NOT_SERVED, served_model

    schema = client.get("/openapi.json").json()["components"]["schemas"]["Prediction"]
    assert list(schema["properties"]) == [f.name for f in fields(Prediction) if f.name not in NOT_SERVED]
    assert schema["required"] == ["id", "modalities"]
    assert schema["properties"]["score"]["description"] == "regression: the predicted score"
    added = make_dataclass("Prediction", [("confidence", float | None, field(default=None, metadata={"doc": "how "
                                                                                                         "sure"}))],
                           bases=(Prediction,))
    model = served_model(added, omit=NOT_SERVED)
    assert model.model_json_schema()["properties"]["confidence"]["description"] == "how sure"
    assert model(id="a", confidence=0.5).model_dump(exclude_none=True) == {"id": "a", "confidence": 0.5}


def test_every_setting_is_a_serve_flag_with_its_default(monkeypatch):
    """ServeSettings' fields are the flags of ``mmsenti serve``: no flags, the settings' defaults (the API key from
    the environment); each flag sets its field (sizes in MB, formats comma-separated)."""
    import argparse
    from dataclasses import fields

    from mmsenti.serve.command import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    monkeypatch.delenv("MMSENTI_API_KEY", raising=False)
    assert ServeSettings.from_args(parser.parse_args(["serve", "RUN"])) == ServeSettings()
    monkeypatch.setenv("MMSENTI_API_KEY", "from-env")
    assert ServeSettings.from_args(parser.parse_args(["serve", "RUN"])).api_key == "from-env"
    given = ServeSettings.from_args(parser.parse_args([
        "serve", "RUN", "--api-key", "k", "--allow-missing-modality", "--max-batch-size", "4", "--max-wait-ms", "0",
        "--max-body-mb", "0.5", "--max-image-mb", "2", "--max-image-pixels", "100", "--max-image-aspect", "3",
        "--min-image-side", "9", "--max-text-chars", "10", "--max-posts", "2", "--max-post-tags", "3",
        "--max-video-mb", "4", "--max-video-seconds", "30", "--image-formats", "png, jpeg", "--model-name", "m"]))
    assert given == ServeSettings(api_key="k", allow_missing_modality=True, max_batch_size=4, max_wait_ms=0,
                                  max_body_bytes=2**19, max_image_bytes=2 * 2**20, max_image_pixels=100,
                                  max_image_aspect=3, min_image_side=9, max_text_chars=10, max_posts=2,
                                  max_post_tags=3, max_video_bytes=4 * 2**20, max_video_seconds=30,
                                  image_formats=("PNG", "JPEG"), model_name="m")
    assert all(getattr(given, f.name) != getattr(ServeSettings(), f.name) for f in fields(ServeSettings))
    assert list(given.limits()) == [f.name for f in fields(ServeSettings) if f.metadata["limit"]]
