"""``create_app(model_dir, settings)``: the FastAPI application (no module-level model)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from mmsenti.inference import Predictor
from mmsenti.serve.dependencies import require_api_key
from mmsenti.serve.errors import BodyLimit, RequestId, install_error_handlers
from mmsenti.serve.routes import V1_ROUTERS, health, web
from mmsenti.serve.schemas import post_schemas
from mmsenti.serve.service import Service
from mmsenti.serve.settings import ServeSettings
from mmsenti.version import __version__

log = logging.getLogger(__name__)


def create_app(model_dir: str | Path, settings: ServeSettings | None = None, predictor: Predictor | None = None,
               device: str = "auto", backend: str = "torch") -> FastAPI:
    """The service of the model in ``model_dir`` (a model or run directory; with ``backend="onnx"`` an export).

    Args:
        settings: limits and options (default :class:`ServeSettings`).
        predictor: an already loaded model (else it is loaded when the app starts).
        device: where to load it.
        backend: ``"torch"`` or ``"onnx"`` (onnxruntime running the model's ONNX export).
    """
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from starlette.concurrency import run_in_threadpool

        pred = predictor or await run_in_threadpool(Predictor.from_pretrained, model_dir, device, backend)
        service = Service(pred, settings, model_dir)
        await service.start()
        app.state.service = service
        log.info("serving %s (version %s, %s)", service.name, service.version, ", ".join(service.modalities))
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="mmsenti", version=__version__, lifespan=lifespan,
                  description="Multimodal sentiment analysis of posts (text + image). Errors are JSON naming the "
                              "field: `{\"error\": {\"status\", \"field\", \"message\"}}`.")
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestId)  # outermost: every answer, a 413 included, carries the request's id
    install_error_handlers(app)
    app.include_router(health.router)
    for router in V1_ROUTERS:
        app.include_router(router, prefix="/v1", dependencies=[Depends(require_api_key)])
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    _document_post_schemas(app)
    return app


def _document_post_schemas(app: FastAPI) -> None:
    """Routes read posts themselves (JSON or multipart); add their schemas to the OpenAPI components, saying what
    the served model requires (so the schema is kept once the model is loaded)."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        service = getattr(app.state, "service", None)
        settings = app.state.settings
        schema.setdefault("components", {}).setdefault("schemas", {}).update(post_schemas(
            service.post_fields if service is not None else None, settings.allow_missing_modality,
            settings.max_text_chars, settings.max_posts, settings.max_post_tags))
        if service is not None:
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
