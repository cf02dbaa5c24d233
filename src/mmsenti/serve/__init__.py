"""``mmsenti serve``: a trained model behind a REST API (FastAPI + pydantic + uvicorn) with a small web page.

``create_app(model_dir, settings)`` builds the app: ``/healthz``, ``/readyz``, ``GET /v1/model``,
``POST /v1/predict``, the page at ``/`` and OpenAPI docs at ``/docs``. Each feature is an ``APIRouter`` in
:mod:`mmsenti.serve.routes`; posts are parsed and validated once (:mod:`mmsenti.serve.posts`) for every route that
reads them, and concurrent posts are batched in front of the model (:mod:`mmsenti.serve.batching`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports the settings without importing FastAPI.
    if name == "create_app":
        from mmsenti.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from mmsenti.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'mmsenti.serve' has no attribute {name!r}")
