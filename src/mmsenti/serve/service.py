"""The service state shared by all routes: the predictor, its micro-batcher, the settings and the model's card."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from mmsenti.data.base import Sample
from mmsenti.inference import Prediction, Predictor
from mmsenti.models.base import check_per_post
from mmsenti.models.folder import ModelFolder
from mmsenti.serve.batching import MicroBatcher
from mmsenti.serve.posts import PreparedPost
from mmsenti.serve.settings import ServeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Service:
    def __init__(self, predictor: Predictor, settings: ServeSettings, model_dir: str | Path):
        """``model_dir`` names the model of a predictor that was not loaded from a folder (built in Python)."""
        check_per_post(predictor.config.model, "served")  # micro-batches mix the posts of different clients
        self.predictor, self.settings = predictor, settings
        self.folder = predictor.folder or ModelFolder.open(model_dir, predictor.backend.name)
        self.name, self.version = settings.model_name or self.folder.name, self.folder.version
        if settings.allow_missing_modality:
            predictor.allow_missing()  # ValueError for a model that cannot hide a modality
            if not predictor.config.model.learns_missing_modalities:
                log.warning("--allow-missing-modality: this model was not trained with modality dropout; "
                            "its predictions from one modality are untested")
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

    @property
    def post_fields(self) -> list[str]:
        """The fields of a post the model reads (``text``, ``image``, or ``tags`` for a tags model's image)."""
        fields = self.predictor.processor.post_fields
        return list(dict.fromkeys(fields[m] for m in self.modalities))  # a clip model's audio and vision: one video

    def _predict_batch(self, posts: list[PreparedPost]) -> list[Prediction]:
        """One model call (in the batcher's thread)."""
        p = self.predictor
        samples = [Sample(id=post.id, label=None, text=post.text, image=post.pixels, tags=post.tags,
                          features=post.features) for post in posts]
        return p.decode(p.run(p.preprocess(samples)), [post.id for post in posts])

    async def predict(self, posts: list[PreparedPost]) -> list[Prediction]:
        """The posts' predictions, each saying which modalities it read (a post may lack one)."""
        predictions = await self.batcher.submit(posts)
        return [replace(p, modalities=post.modalities) for post, p in zip(posts, predictions, strict=True)]

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
        """``GET /v1/model``: the service's answer, with the model's own fields (``ModelConfig.card``: backbones)."""
        cfg = self.predictor.config
        return {**self.model_ref(), "backend": self.predictor.backend.name,
                "task": self.predictor.info.task, "labels": self.predictor.label_names,
                "modalities": self.modalities, "model": cfg.model.name, **cfg.model.card(),
                "dataset": cfg.data.name, "metrics": self.folder.metrics,
                "allow_missing_modality": self.settings.allow_missing_modality, "limits": self.settings.limits()}
