"""Request and response models (pydantic): what ``/docs`` shows and what every route validates against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Post(BaseModel):
    """One post. ``image`` is the encoded image file (JPEG, PNG, ...) in base64 (a ``data:`` URL is accepted)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=256, description="returned with its prediction (default: its position)")
    text: str | None = Field(None, description="the post's text")
    image: str | None = Field(None, description="base64 of the image file")


class PostBatch(BaseModel):
    """Several posts in one request; predictions come back in the same order."""

    model_config = ConfigDict(extra="forbid")

    posts: list[Post] = Field(..., min_length=1)


def post_schemas(modalities: list[str] | None, allow_missing: bool, max_text_chars: int, max_posts: int) -> dict:
    """JSON schemas of ``Post``, ``PostBatch`` and ``PostForm`` (a multipart post) that say what the server checks:
    the modalities the model reads are required non-empty strings, or (``allow_missing``, or the model not known yet)
    at least one of them is. Pydantic's schema of :class:`Post` alone would allow ``{}`` and all-null posts."""
    modalities = modalities or ["text", "image"]
    post = Post.model_json_schema(ref_template="#/components/schemas/{model}")
    batch = PostBatch.model_json_schema(ref_template="#/components/schemas/{model}")
    batch.pop("$defs", None)
    batch["properties"]["posts"]["maxItems"] = max_posts
    form = {"type": "object", "additionalProperties": False, "description": "one post as multipart/form-data",
            "properties": {"id": {"type": "string", "maxLength": 256}, "text": {"type": "string"},
                           "image": {"type": "string", "format": "binary", "description": "the image file"}}}
    given = {"text": {"type": "string", "minLength": 1, "maxLength": max_text_chars}, "image": {"type": "string",
                                                                                               "minLength": 1}}
    post["properties"]["text"]["anyOf"][0]["maxLength"] = max_text_chars
    form["properties"]["text"]["maxLength"] = max_text_chars
    reads = [m for m in ("text", "image") if m in modalities]
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


class Prediction(BaseModel):
    id: str
    label: str | None = Field(None, description="classification: the most probable label")
    probabilities: dict[str, float] | None = Field(None, description="classification: probability per label")
    score: float | None = Field(None, description="regression: the predicted score")
    modalities: list[str] = Field(..., description="the modalities the prediction read")


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
    backbones: dict[str, str]
    dataset: str = Field(..., description="the training config's dataset")
    metrics: dict | None = Field(None, description="the run's metrics.json (dev-selected model), when present")
    allow_missing_modality: bool
    limits: dict[str, object]


ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}
