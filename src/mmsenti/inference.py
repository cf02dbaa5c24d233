"""Prediction with a trained model, in Python (``mmsenti.load_model``) and for the CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsenti.data.base import Sample
from mmsenti.models.base import load_pretrained
from mmsenti.train.evaluate import predict_batches
from mmsenti.utils import resolve_device


class Predictor:
    """A loaded model with its preprocessing.

    Example::

        model = mmsenti.load_model("runs/quickstart")
        model.predict("Hoping for sun at the picnic, anything but rain", image="photo.png")
        # {'label': 'positive', 'probabilities': {'negative': 0.01, 'neutral': 0.02, 'positive': 0.97}}
    """

    def __init__(self, model, processor, config):
        self.model, self.processor, self.config = model, processor, config
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto") -> Predictor:
        model, processor, cfg = load_pretrained(path, resolve_device(device))
        return cls(model, processor, cfg)

    @property
    def modalities(self) -> list[str]:
        return self.processor.modalities

    @property
    def label_names(self) -> list[str] | None:
        return self.model.info.label_names

    def predict(self, text: str | None = None, image: Any = None) -> dict:
        """Predict one post; ``image`` is a path or a PIL image."""
        return self.predict_samples([Sample(id="0", label=None, text=text, image=image)])[0]

    def predict_samples(self, samples: Sequence[Sample], batch_size: int = 64) -> list[dict]:
        batches = (self.processor(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size))
        results: list[dict] = []
        for r in predict_batches(self.model, batches, self.device):
            for sid, row in zip(r["ids"], r["logits"], strict=True):
                results.append({"id": sid, **self._decode(row)})
        return results

    def _decode(self, logits: np.ndarray) -> dict:
        if self.model.info.task == "regression":
            return {"score": float(logits[0])}
        probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        names = self.label_names
        return {"label": names[int(probs.argmax())],
                "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs, strict=True)}}


def read_prediction_file(path: str | Path, modalities: Sequence[str]) -> list[Sample]:
    """Posts to predict from a ``.jsonl`` or ``.csv``/``.tsv`` file: ``text``, ``image`` (a path relative to the
    file), optional ``id`` (default: the line number). A field the model reads but a row lacks is an error naming
    the file and line."""
    from mmsenti.data.base import DataError
    from mmsenti.data.formats.user import read_records

    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    samples = []
    for line, row in read_records(path):
        for field in ("text", "image"):
            if field in modalities and row.get(field) in (None, ""):
                raise DataError(f"{path}:{line}: missing '{field}' (this model reads {' and '.join(modalities)})")
        image = row.get("image")
        samples.append(Sample(id=str(row.get("id") or line), label=None, text=row.get("text"),
                              image=(path.parent / image) if image and "image" in modalities else None))
    if not samples:
        raise DataError(f"{path}: no rows to predict")
    return samples


def load_model(path: str | Path, device: str = "auto") -> Predictor:
    """Load a trained model (a model directory or a training run directory) for prediction."""
    return Predictor.from_pretrained(path, device)


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
