"""``POST /v1/predict``: one post or a list of posts → label + probabilities (or score) per post, in order."""

from __future__ import annotations

from fastapi import APIRouter, Request

from mmsenti.serve.dependencies import ServiceDep
from mmsenti.serve.posts import read_posts
from mmsenti.serve.schemas import ERROR_RESPONSES, PredictResponse

router = APIRouter(tags=["predict"])

# The body is read by read_posts (JSON or multipart), so its schema is declared here for the OpenAPI docs
# (create_app adds the Post, PostBatch and PostForm schemas to the components: post_schemas).
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/Post"},
                                                      {"$ref": "#/components/schemas/PostBatch"}]}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/PostForm"}},
        },
    }
}


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
             responses=ERROR_RESPONSES, openapi_extra=_BODY,
             summary="predict the sentiment of one post or a list of posts")
async def predict(request: Request, service: ServiceDep) -> dict:
    posts = await read_posts(request, service.settings, service.modalities, service.predictor.processor)
    return {"model": service.model_ref(), "predictions": [p.to_dict() for p in await service.predict(posts)]}

