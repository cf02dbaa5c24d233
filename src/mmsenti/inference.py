"""Prediction with a trained model, in Python (``mmsenti.load_model``), for the CLI and for the service.

A :class:`Predictor` runs three separate steps, so each can be replaced on its own:

1. :meth:`Predictor.preprocess` — samples → a batch dict of tensors (the processor's evaluation inputs);
2. :meth:`Predictor.run` — batch → logits, through a *backend* (:class:`TorchBackend`; another runtime, e.g. ONNX,
   replaces only this step);
3. :meth:`Predictor.decode` — logits → label + probabilities (or a score for regression) per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mmsenti.data.base import Sample
from mmsenti.models.base import TaskInfo, load_pretrained
from mmsenti.utils import resolve_device


class Backend(Protocol):
    """The model call of a :class:`Predictor`: a batch of tensors → (B, num_outputs) float logits."""

    name: str

    def __call__(self, batch: dict[str, Any]) -> np.ndarray: ...


class TorchBackend:
    """The PyTorch model in eval mode, under ``torch.inference_mode``."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        from mmsenti.train.evaluate import move

        with torch.inference_mode():
            return self.model(move(batch, self.device))["logits"].float().cpu().numpy()


class Predictor:
    """A loaded model with its preprocessing.

    Example::

        model = mmsenti.load_model("runs/quickstart")
        model.predict("Hoping for sun at the picnic, anything but rain", image="photo.png")
        # {'label': 'positive', 'probabilities': {'negative': 0.01, 'neutral': 0.02, 'positive': 0.97}}
    """

    def __init__(self, model, processor, config, backend: Backend | None = None):
        self.model, self.processor, self.config = model, processor, config
        self.info: TaskInfo = model.info
        self.backend: Backend = backend if backend is not None else TorchBackend(model)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto") -> Predictor:
        model, processor, cfg = load_pretrained(path, resolve_device(device))
        return cls(model, processor, cfg)

    @property
    def device(self) -> torch.device:
        return getattr(self.backend, "device", torch.device("cpu"))

    @property
    def modalities(self) -> list[str]:
        return self.processor.modalities

    @property
    def label_names(self) -> list[str] | None:
        return self.info.label_names

    @property
    def allow_missing_modality(self) -> bool:
        return self.processor.allow_missing

    def allow_missing(self) -> None:
        """Accept posts that lack one of the model's modalities: the model then hides it from fusion (as in
        training with modality dropout). Raises ValueError for a model that cannot."""
        if not getattr(self.model, "supports_missing_modality", False):
            raise ValueError(f"model '{self.config.model.name}' with modalities {self.modalities} cannot predict "
                             "from a post that lacks one of them")
        self.processor.allow_missing = True

    # ----------------------------------------------------------------------------------------------- steps
    def preprocess(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """Samples (images as paths, PIL images or already transformed tensors) → the batch of model inputs."""
        return self.processor(samples, training=False)

    def run(self, batch: dict[str, Any]) -> np.ndarray:
        """Batch → (B, num_outputs) logits, through the backend."""
        return self.backend(batch)

    def decode(self, logits: np.ndarray) -> list[dict]:
        """Logits → per sample ``{"label", "probabilities"}`` (classification) or ``{"score"}`` (regression)."""
        if self.info.task == "regression":
            return [{"score": float(row[0])} for row in logits]
        probs = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=-1).numpy()
        names = self.label_names
        return [{"label": names[int(p.argmax())],
                 "probabilities": {n: round(float(v), 6) for n, v in zip(names, p, strict=True)}} for p in probs]

    # -------------------------------------------------------------------------------------------- shortcuts
    def predict(self, text: str | None = None, image: Any = None) -> dict:
        """Predict one post; ``image`` is a path or a PIL image."""
        return self.predict_samples([Sample(id="0", label=None, text=text, image=image)])[0]

    def predict_samples(self, samples: Sequence[Sample], batch_size: int = 64) -> list[dict]:
        results: list[dict] = []
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            rows = self.decode(self.run(self.preprocess(chunk)))
            results += [{"id": s.id, **row} for s, row in zip(chunk, rows, strict=True)]
        return results


def load_model(path: str | Path, device: str = "auto") -> Predictor:
    """Load a trained model (a model directory or a training run directory) for prediction."""
    return Predictor.from_pretrained(path, device)
