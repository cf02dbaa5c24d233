"""One ``APIRouter`` per feature. A new feature (e.g. ``/v1/explain``) adds a module here with its own router,
reads posts with :func:`mmsenti.serve.posts.read_posts`, and is listed in :data:`V1_ROUTERS`."""

from __future__ import annotations

from mmsenti.serve.routes import model_card, predict

V1_ROUTERS = [model_card.router, predict.router]  # mounted under /v1, behind the API key
