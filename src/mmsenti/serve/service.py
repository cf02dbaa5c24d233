"""The service state shared by all routes: the predictor, its micro-batcher, the settings and the model's card."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from mmsenti.data.base import Sample
from mmsenti.inference import ModelRef, Predictor, check_per_post
from mmsenti.serve.batching import MicroBatcher
from mmsenti.serve.errors import ServeError
from mmsenti.serve.posts import PreparedPost
from mmsenti.serve.settings import ServeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Service:
    def __init__(self, predictor: Predictor, settings: ServeSettings, model_dir: str | Path):
        check_per_post(predictor.config.model, "served")  # micro-batches mix the posts of different clients
        self.predictor, self.settings = predictor, settings
        ref = ModelRef.of(predictor, model_dir, settings.model_name)
        self.model_dir, self.name, self.version = ref.directory, ref.name, ref.version
        if settings.allow_missing_modality:
            predictor.allow_missing()  # ValueError for a model that cannot hide a modality
            if getattr(predictor.config.model, "modality_dropout", 0.0) == 0.0:
                log.warning("--allow-missing-modality: this model was not trained with modality dropout; "
                            "its predictions from one modality are untested")
        metrics_path = ref.run_dir / "metrics.json"
        self.metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        self.batcher = MicroBatcher(self._predict_batch, settings.max_batch_size, settings.max_wait_ms)
        # Explanations' figures are drawn here, off the model thread (matplotlib needs no model); one at a time.
        self._figures = ThreadPoolExecutor(1, thread_name_prefix="mmsenti-figures")
        self.ready = False

    # ------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()
        self._figures.shutdown(wait=False)

    # ------------------------------------------------------------------------------------------- prediction
    @property
    def modalities(self) -> list[str]:
        return self.predictor.modalities

    def _predict_batch(self, posts: list[PreparedPost]) -> list[dict]:
        """One model call (in the batcher's thread)."""
        p = self.predictor
        samples = [Sample(id=post.id, label=None, text=post.text, image=post.pixels) for post in posts]
        return p.decode(p.run(p.preprocess(samples)))

    async def predict(self, posts: list[PreparedPost]) -> list[dict]:
        rows = await self.batcher.submit(posts)
        return [{"id": post.id, **row, "modalities": post.modalities} for post, row in zip(posts, rows, strict=True)]

    async def on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the model's thread, between prediction batches (an explanation: its forward and
        backward passes and Captum's hooks never overlap a prediction). Predictions wait while it runs."""
        return await self.batcher.run_on_model_thread(fn, *args)

    async def drawing(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the figure thread (matplotlib; no model)."""
        return await asyncio.get_running_loop().run_in_executor(self._figures, fn, *args)

    def model_ref(self) -> dict:
        return {"name": self.name, "version": self.version}

    def card(self) -> dict:
        cfg = self.predictor.config
        backbones = {m: getattr(cfg.model, f"{m}_encoder").name for m in ("text", "image") if m in self.modalities}
        return {**self.model_ref(), "backend": self.predictor.backend.name,
                "task": self.predictor.info.task, "labels": self.predictor.label_names,
                "modalities": self.modalities, "model": cfg.model.name, "backbones": backbones,
                "dataset": cfg.data.name, "metrics": self.metrics,
                "allow_missing_modality": self.settings.allow_missing_modality, "limits": self.settings.limits()}


# ------------------------------------------------------------------------------------------------ dependencies
def get_service(request: Request) -> Service:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise ServeError(503, None, "the model is not ready")
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_api_key(request: Request) -> None:
    """Every /v1 route: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` when the server has a key."""
    service: Service | None = getattr(request.app.state, "service", None)
    key = service.settings.api_key if service is not None else request.app.state.settings.api_key
    if not key:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise ServeError(401, "X-API-Key", "missing or wrong API key" if given is not None else "API key required")
