"""Request and response models (pydantic): what ``/docs`` shows and what every route validates against."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from mmsenti import inference
from mmsenti.data.base import MAX_TAG_CHARS

# A post's tags as the schema shows them (the server checks them with mmsenti.data.base.parse_tags; the count limit
# is the setting max_post_tags, added by post_schemas).
TAGS_SCHEMA = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_TAG_CHARS}}


class Post(BaseModel):
    """One post. ``image`` is the encoded image file (JPEG, PNG, ...) in base64 (a ``data:`` URL is accepted);
    ``tags`` are words or ids describing the image, for a model whose image encoder is ``tags``."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=256, description="returned with its prediction (default: its position)")
    text: str | None = Field(None, description="the post's text")
    image: str | None = Field(None, description="base64 of the image file")
    # Any here: parse_tags checks the value (the same check and message as a file's), the schema says what it takes.
    tags: Any = Field(None, description="the image's tags (a model whose image encoder is tags reads its first "
                                        "max_tags, GET /v1/model); a form field: one string, tags separated by |",
                      json_schema_extra={"anyOf": [TAGS_SCHEMA, {"type": "null"}]})


class PostBatch(BaseModel):
    """Several posts in one request; predictions come back in the same order."""

    model_config = ConfigDict(extra="forbid")

    posts: list[Post] = Field(..., min_length=1)


def post_schemas(fields: list[str] | None, allow_missing: bool, max_text_chars: int, max_posts: int,
                 max_post_tags: int) -> dict:
    """JSON schemas of ``Post``, ``PostBatch`` and ``PostForm`` (a multipart post) that say what the server checks:
    the fields the model reads (``fields``: ``text``, ``image``, or ``tags`` for a tags model's image) are required
    and non-empty, or (``allow_missing``, or the model not known yet) at least one of them is. Pydantic's schema of
    :class:`Post` alone would allow ``{}`` and all-null posts."""
    fields = fields or ["text", "image"]
    post = Post.model_json_schema(ref_template="#/components/schemas/{model}")
    batch = PostBatch.model_json_schema(ref_template="#/components/schemas/{model}")
    batch.pop("$defs", None)
    batch["properties"]["posts"]["maxItems"] = max_posts
    form = {"type": "object", "additionalProperties": False, "description": "one post as multipart/form-data",
            "properties": {"id": {"type": "string", "maxLength": 256}, "text": {"type": "string"},
                           "image": {"type": "string", "format": "binary", "description": "the image file"},
                           "tags": {"type": "string", "description": "the image's tags, separated by |"},
                           "video": {"type": "string", "format": "binary",
                                     "description": "a clip (a model trained on extracted clip features)"}}}
    tags = {**TAGS_SCHEMA, "minItems": 1, "maxItems": max_post_tags}
    given = {"text": {"type": "string", "minLength": 1, "maxLength": max_text_chars},
             "image": {"type": "string", "minLength": 1}, "tags": tags}
    post["properties"]["text"]["anyOf"][0]["maxLength"] = max_text_chars
    post["properties"]["tags"]["anyOf"] = [{**TAGS_SCHEMA, "maxItems": max_post_tags}, {"type": "null"}]  # a copy
    form["properties"]["text"]["maxLength"] = max_text_chars
    reads = [m for m in ("text", "image", "tags") if m in fields]
    if "video" in fields:  # a clip travels only as a multipart file: JSON posts cannot carry one
        form["required"] = [m for m in ("text", "video") if m in fields]
        return {"Post": post, "PostBatch": batch, "PostForm": form}
    if allow_missing and len(reads) > 1:
        for schema in (post, form):
            schema["anyOf"] = [{"required": [m], "properties": {m: given[m]}} for m in reads]
    else:
        for m in reads:
            post["properties"][m] = {**{k: v for k, v in post["properties"][m].items() if k not in ("anyOf", "default")},
                                     **given[m]}
            form["properties"][m] = {**form["properties"][m], "minLength": 1}
        post["required"] = form["required"] = reads
    return {"Post": post, "PostBatch": batch, "PostForm": form}


class ModelRef(BaseModel):
    name: str
    version: str = Field(..., description="first 12 hex digits of the sha256 of model.safetensors")


# The service answers a bad post with a 4xx, never with a row saying what was wrong with it (a prediction file's).
NOT_SERVED = ("line", "error")
ALWAYS_SERVED = ("modalities",)  # every answer says which modalities it read (a post may lack one)


def served_model(cls: type, omit: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> type[BaseModel]:
    """The pydantic model of a dataclass's fields, with their ``doc`` metadata as descriptions: what the service
    writes is then what it documents, and a field added to the dataclass is served, never silently dropped."""
    hints = typing.get_type_hints(cls)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in omit:
            continue
        hint, description = hints[f.name], f.metadata.get("doc")
        if f.default is dataclasses.MISSING or f.name in required:
            spec[f.name] = (_without_none(hint), Field(..., description=description))
        else:
            spec[f.name] = (hint, Field(f.default, description=description))
    return create_model(cls.__name__, **spec)


def _without_none(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint


Prediction = served_model(inference.Prediction, omit=NOT_SERVED, required=ALWAYS_SERVED)


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class ErrorDetail(BaseModel):
    status: int
    field: str | None = Field(None, description="the request field at fault, e.g. posts[0].image")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelInfo(BaseModel):
    name: str
    version: str
    backend: str = Field(..., description="torch, or onnx (onnxruntime running the model's ONNX export)")
    task: str
    labels: list[str] | None
    modalities: list[str]
    model: str = Field(..., description="the registered model (mmsenti list models)")
    backbones: dict[str, str] = Field(..., description="per modality; a tags image encoder: tags (its embedding)")
    max_tags: int | None = Field(None, description="a tags image encoder: the tags of a post it reads (the first)")
    extraction: dict[str, Any] | None = Field(None, description="a clip model: the feature extraction settings an "
                                                           "uploaded clip goes through (mmsenti features extract)")
    dataset: str = Field(..., description="the training config's dataset")
    metrics: dict | None = Field(None, description="the run's metrics.json (dev-selected model), when present")
    allow_missing_modality: bool
    limits: dict[str, object]


ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}
