"""``POST /v1/explain``: why the model said it, for one post: the explanation as JSON (with the figures as PNG data
URLs on request) or one figure as ``image/png``.

An explanation runs dozens of forward and backward passes (Integrated Gradients) and adds Captum's hooks to the
model, so it runs on the model's own thread, between prediction batches (:meth:`Service.on_model_thread`): nothing
ever runs the model concurrently, and predictions that arrive meanwhile wait for it. Its figures are drawn after,
off that thread.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from mmsenti.explain.options import IMAGE_BASELINES, SOURCES, ExplainOptions
from mmsenti.serve.dependencies import ServiceDep
from mmsenti.serve.errors import ServeError
from mmsenti.serve.posts import read_posts
from mmsenti.serve.routes.predict import _BODY
from mmsenti.serve.schemas import ERROR_RESPONSES, ModelRef
from mmsenti.serve.service import Service

router = APIRouter(tags=["explain"])

FIGURES = ("word_regions", "word_tags", "importance", "attribution")
MAX_IG_STEPS = 256
_D = ExplainOptions()  # the defaults


class ExplainResponse(BaseModel):
    model: ModelRef
    explanation: dict = Field(..., description="the explanation of the post's prediction (docs/explain.md): "
                                               "prediction, words, word_regions (tags models: tags, word_tags), "
                                               "modality, text_attribution, image_attribution (tags models: "
                                               "tag_attribution), neighbours, notes")
    figures: dict[str, str] | None = Field(None, description="requested figures as data:image/png;base64 URLs")


@router.post("/explain", response_model=ExplainResponse, response_model_exclude_none=True,
             responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}}}}, openapi_extra=_BODY,
             summary="explain the prediction for one post (heat maps, attributions, neighbours)")
async def explain(
    request: Request, service: ServiceDep,
    format: Annotated[Literal["json", "png"], Query(description="json: the explanation; png: one figure")] = "json",
    figure: Annotated[Literal[FIGURES] | None, Query(
        description="format=png: which figure (default: word_regions, or word_tags, when the model has it, else "
                    "attribution)")] = None,
    figures: Annotated[str | None, Query(description="format=json: comma-separated figures to include as PNG")] = None,
    words: Annotated[int, Query(ge=0, le=20, description="words drawn in the word → region figure")] = _D.words,
    word: Annotated[list[str] | None, Query(description="draw these words instead")] = None,
    source: Annotated[list[Literal[SOURCES]] | None, Query(description="rows of the word → region figure")] = None,
    layer: Annotated[int, Query(ge=1, description="HFAM layer of the similarity map (1 = last)")] = _D.hfam_layer,
    ig_steps: Annotated[int, Query(ge=0, le=MAX_IG_STEPS,
                                   description="Integrated Gradients steps (0: none)")] = _D.ig_steps,
    image_baseline: Annotated[Literal[IMAGE_BASELINES], Query(
        description="neutral image: the mean colour, or the image blurred")] = _D.image_baseline,
) -> Response | dict:
    if service.predictor.model is None:
        raise ServeError(501, None, "explanations need the PyTorch model; this service runs an ONNX export "
                                    "(start it with --backend torch)")
    wanted = [f.strip() for f in figures.split(",") if f.strip()] if figures else []
    bad = [f for f in wanted if f not in FIGURES]
    if bad:
        raise ServeError(422, "figures", f"unknown figure {bad[0]!r} (choose from {', '.join(FIGURES)})")
    posts = await read_posts(request, service.settings, service.modalities, service.predictor.processor)
    if len(posts) != 1:
        raise ServeError(422, "posts", f"explain takes one post per request, got {len(posts)}")
    options = ExplainOptions(words=words, select=tuple(word) if word else None,
                             sources=tuple(source) if source else _D.sources, hfam_layer=layer,
                             integrated_gradients=ig_steps > 0, ig_steps=max(ig_steps, 1),
                             image_baseline=image_baseline)
    if format == "png":
        wanted = [figure] if figure else []
    post = posts[0]
    ex = await service.on_model_thread(_explain, service, post, options)
    pngs = await service.drawing(_figures, ex, post, options, wanted, format == "png" and figure is None)
    if format == "png":
        name, data = next(iter(pngs.items()), (None, None))
        if data is None:
            raise ServeError(422, "figure", f"this model and post have no {figure or 'figure'} "
                                            f"(have: {', '.join(pngs) or 'none'})")
        return Response(data, media_type="image/png", headers={"X-Mmsenti-Figure": name})
    body = {"model": service.model_ref(), "explanation": ex.to_dict()}
    if wanted:
        body["figures"] = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in pngs.items()}
    return body


def _explain(service: Service, post, options: ExplainOptions):
    """On the model's thread: the explanation."""
    from mmsenti.data.base import Sample
    from mmsenti.explain.core import explain

    sample = Sample(id=post.id, label=None, text=post.text, image=post.image, tags=post.tags, features=post.features)
    try:
        return explain(service.predictor, sample, options)
    except ValueError as e:  # an option this model cannot honour (e.g. an HFAM layer it does not have)
        raise ServeError(422, "layer" if "hfam_layer" in str(e) else None, str(e)) from None


def _figures(ex, post, options: ExplainOptions, wanted: list[str], default_figure: bool) -> dict[str, bytes]:
    """In the figure thread: the wanted figures as PNG bytes (those the explanation has)."""
    from mmsenti.explain.figures import figures_for, save_png

    if not (wanted or default_figure):
        return {}
    figs = figures_for(ex, post.image, options.sources)
    if default_figure:
        wanted = [next((f for f in ("word_regions", "word_tags") if f in figs), "attribution")]
    return {name: save_png(figs[name]) for name in wanted if name in figs}
