"""Posts from a request: parsed (JSON or multipart), validated against the model and the limits, images decoded.

Every route that reads posts (``/v1/predict``, later ``/v1/explain``) calls :func:`read_posts`, so validation,
limits and error messages are the same everywhere. Decoding runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import Request
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from mmsenti.data.base import DataError, image_shape_problem, parse_tags, text_problem
from mmsenti.serve.errors import ServeError, field_path, validation_message
from mmsenti.serve.schemas import Post, PostBatch
from mmsenti.serve.settings import ServeSettings

MULTIPART_FIELDS = ("id", "text", "image", "tags", "video")


@dataclass
class PreparedPost:
    """A validated post: text, the transformed image (``pixel_values`` of one sample), its tags (what a tags model
    reads of its image) and the modalities it holds."""

    id: str
    text: str | None
    pixels: torch.Tensor | None
    image: Image.Image | None  # the decoded image (for routes that draw on it)
    modalities: list[str]
    tags: list[str] | None = None
    features: dict[str, np.ndarray] | None = None  # a clip model's: extracted from the uploaded clip


async def read_posts(request: Request, settings: ServeSettings, modalities: list[str], processor) -> list[PreparedPost]:
    """The request's posts, validated and decoded; a :class:`ServeError` naming the field otherwise."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        posts, prefix = await _json_posts(request, settings)
        images = [(p.image, _join(prefix(i), "image"), False) for i, p in enumerate(posts)]
        videos: list[bytes | None] = [None] * len(posts)
    elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):  # an HTML form
        post, data, video = await _multipart_post(request, ctype, settings)
        posts, prefix = [post], (lambda i: "")
        images, videos = [(data, "image", True)], [video]
    else:
        raise ServeError(415, "content-type", f"expected application/json or multipart/form-data, got {ctype or 'none'}")
    return await run_in_threadpool(_prepare, posts, images, videos, prefix, settings, modalities, processor)


async def _json_posts(request: Request, settings: ServeSettings):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServeError(400, "body", f"invalid JSON: {getattr(e, 'msg', e)}") from None
    except RecursionError:  # e.g. 100,000 nested '[': no post is nested more than a few levels
        raise ServeError(400, "body", "invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ServeError(422, "body", f"expected a JSON object (one post, or {{\"posts\": [...]}}), "
                                      f"got {type(data).__name__}")
    batch = "posts" in data
    if batch and isinstance(data["posts"], list) and len(data["posts"]) > settings.max_posts:
        raise ServeError(413, "posts", f"{len(data['posts'])} posts, at most {settings.max_posts} per request")
    try:
        posts = PostBatch.model_validate(data).posts if batch else [Post.model_validate(data)]
    except ValidationError as e:
        err = e.errors()[0]
        raise ServeError(422, field_path(err["loc"]), validation_message(err)) from None
    return posts, (lambda i: f"posts[{i}]") if batch else (lambda i: "")


async def _multipart_post(request: Request, ctype: str, settings: ServeSettings
                          ) -> tuple[Post, bytes | None, bytes | None]:
    from starlette.datastructures import UploadFile

    if ctype == "application/x-www-form-urlencoded" and (await request.body()).lstrip()[:1] in (b"{", b"["):
        # A JSON body sent with a form's content type (curl -d without -H): parsed as a form, its whole text
        # would become one field's name.
        raise ServeError(415, "content-type", "the body is JSON but was sent as application/x-www-form-urlencoded: "
                                              "send it with Content-Type: application/json")
    try:
        form = await request.form(max_files=1, max_fields=len(MULTIPART_FIELDS))
    except ServeError:
        raise
    except Exception as e:  # noqa: BLE001 - starlette/python-multipart raise several types for a broken body
        raise ServeError(400, "body", f"invalid multipart body: {e}") from None
    unknown = [k for k in form.keys() if k not in MULTIPART_FIELDS]
    if unknown:
        name = unknown[0] if len(unknown[0]) <= 64 else unknown[0][:61] + "..."
        raise ServeError(422, name, f"unknown field (expected {', '.join(MULTIPART_FIELDS)})")
    values = {}
    for key in ("id", "text", "tags"):
        v = form.get(key)
        if isinstance(v, UploadFile):
            raise ServeError(422, key, "expected a form field, got a file")
        values[key] = v
    files = {}
    for key in ("image", "video"):
        upload = form.get(key)
        if upload is not None and not isinstance(upload, UploadFile):
            raise ServeError(422, key, "expected a file upload (multipart file field)")
        files[key] = await upload.read() if upload is not None else None
    data, video = files["image"], files["video"]
    if video is not None and len(video) > settings.max_video_bytes:
        raise ServeError(413, "video", f"{len(video)} bytes, at most {settings.max_video_bytes} (max_video_bytes)")
    try:
        tags = parse_tags(values["tags"], cell=True)  # one form field: tags separated by |
    except DataError as e:
        raise ServeError(422, "tags", str(e)) from None
    try:
        return Post(id=values["id"], text=values["text"], tags=tags), data, video
    except ValidationError as e:  # e.g. an id over its length limit
        err = e.errors()[0]
        raise ServeError(422, field_path(err["loc"]), validation_message(err)) from None


def _prepare(posts: list[Post], images, videos, prefix, settings: ServeSettings, modalities: list[str],
             processor) -> list[PreparedPost]:
    fields = processor.post_fields  # modality -> the post's field that carries it (a tags model's image: tags)
    reads = list(dict.fromkeys(fields[m] for m in modalities))  # a clip model's audio and vision: one video
    out = []
    for i, (post, (encoded, image_field, is_bytes), video) in enumerate(zip(posts, images, videos, strict=True)):
        text_field = _join(prefix(i), "text")
        if post.text is not None and len(post.text) > settings.max_text_chars:
            raise ServeError(422, text_field, f"{len(post.text)} characters, at most {settings.max_text_chars}")
        # Legal JSON that no tokenizer (text) or UTF-8 answer (id) can take: refused here, not in the model's batch.
        for name, value in (("text", post.text), ("id", post.id)):
            problem = text_problem(value) if value is not None else None
            if problem:
                raise ServeError(422, _join(prefix(i), name), f"the {name} {problem}")
        text = post.text if "text" in modalities and post.text not in (None, "") else None
        image = pixels = tags = None
        if "image" in reads and encoded not in (None, b"", ""):
            data = encoded if is_bytes else _base64(encoded, image_field)
            image = decode_image(data, image_field, settings)
            pixels = processor.image_transform(image)
        if "tags" in reads:
            try:
                tags = parse_tags(post.tags, max_count=settings.max_post_tags)
            except DataError as e:
                raise ServeError(422, _join(prefix(i), "tags"), str(e)) from None
        features = extract_clip(video, processor, settings) if "video" in reads and video else None
        given = {"text": text, "image": pixels, "tags": tags or None,  # no tags ([]) is a post without its image
                 "video": features}
        used = [m for m in modalities if given.get(fields[m]) is not None]
        missing = [m for m in modalities if m not in used]
        if not used:
            field = prefix(i) or "body"
            raise ServeError(422, field, f"the post has no {' or '.join(reads)} (this model reads "
                                         f"{' and '.join(reads)}{VIDEO_HINT if 'video' in reads else ''})")
        if missing and not settings.allow_missing_modality:
            name = fields[missing[0]]
            raise ServeError(422, _join(prefix(i), name), f"missing {name}: this model reads {' and '.join(reads)}"
                                                          f"{VIDEO_HINT if name == 'video' else ''} "
                                                          "(a server started with --allow-missing-modality accepts "
                                                          "posts without one)")
        out.append(PreparedPost(post.id if post.id is not None else str(i), text, pixels, image, used, tags,
                                features))
    return out


VIDEO_HINT = "; a clip is sent as the file field 'video' of a multipart/form-data post"


def extract_clip(data: bytes, processor, settings: ServeSettings) -> dict[str, np.ndarray]:
    """An uploaded clip's features, extracted with the model's own settings (in a request thread, never on the model's
    thread); a 413 for a clip over ``max_video_seconds``, a 422 naming ``video`` for one that cannot be used."""
    from mmsenti.data.base import Sample
    from mmsenti.data.video.decode import probe

    with tempfile.TemporaryDirectory(prefix="mmsenti-clip-") as tmp:
        path = Path(tmp) / "clip"
        path.write_bytes(data)
        try:
            seconds = probe(path).duration
            if seconds > settings.max_video_seconds:
                raise ServeError(413, "video", f"a clip of {seconds:.1f} s, at most {settings.max_video_seconds:g} s "
                                               "(max_video_seconds)")
            sample = processor.prepare(Sample(id="upload", label=None, video=path))
        except DataError as e:
            raise ServeError(422, "video", str(e).replace(str(path), "the uploaded clip")) from None
    return sample.features or {}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _base64(value: str, field: str) -> bytes:
    if value.startswith("data:"):  # a data URL, as a browser's FileReader gives it
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ServeError(422, field, f"not valid base64 ({e})") from None


def decode_image(data: bytes, field: str, settings: ServeSettings) -> Image.Image:
    """Decode an uploaded image as RGB, within the limits. Size and format are checked from the header, before
    the pixels are decoded. (Not :func:`mmsenti.data.processing.open_image`: that reads files and reports paths.)"""
    if len(data) > settings.max_image_bytes:
        raise ServeError(413, field, f"image of {len(data)} bytes, at most {settings.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in settings.image_formats:
                raise ServeError(422, field, f"image format {im.format} not accepted "
                                             f"(allowed: {', '.join(settings.image_formats)})")
            width, height = im.size
            if width * height > settings.max_image_pixels:
                raise ServeError(413, field, f"image of {width}x{height} pixels, at most {settings.max_image_pixels}")
            problem = image_shape_problem(width, height, settings.max_image_aspect, settings.min_image_side)
            if problem:
                raise ServeError(422, field, problem)
            im.load()
            return im.convert("RGB")
    except ServeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ServeError(413, field, f"image too large to decode safely ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise ServeError(422, field, f"cannot decode the image ({type(e).__name__}: {e})") from None
