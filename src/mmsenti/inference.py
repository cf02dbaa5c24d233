"""Prediction with a trained model, in Python (``mmsenti.load_model``), for the CLI and for the service.

A :class:`Predictor` runs three separate steps, so each can be replaced on its own:

1. :meth:`Predictor.preprocess` — samples → a batch dict of tensors (the processor's evaluation inputs);
2. :meth:`Predictor.run` — batch → logits, through a *backend* (:class:`TorchBackend`, or onnxruntime running an
   exported graph: :class:`mmsenti.export.OnnxBackend`, ``backend="onnx"``); only this step differs between them;
3. :meth:`Predictor.decode` — logits → label + probabilities (or a score for regression) per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mmsenti.data.base import DataError, Sample, text_problem
from mmsenti.models.base import TaskInfo, load_pretrained, resolve_model_dir
from mmsenti.utils import file_sha256, move, resolve_device


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
        with torch.inference_mode():
            return self.model(move(batch, self.device))["logits"].float().cpu().numpy()


class Predictor:
    """A loaded model with its preprocessing.

    Example::

        model = mmsenti.load_model("runs/quickstart")
        model.predict("Hoping for sun at the picnic, anything but rain", image="photo.png")
        # {'label': 'positive', 'probabilities': {'negative': 0.01, 'neutral': 0.02, 'positive': 0.97}}
    """

    source: Path | None = None  # the folder it was loaded from (names the model: ModelRef.of)

    def __init__(self, model, processor, config, backend: Backend | None = None, info: TaskInfo | None = None):
        """``model`` may be None when a ``backend`` runs the model elsewhere (an ONNX graph); ``info`` then says
        its task and labels."""
        self.model, self.processor, self.config = model, processor, config
        self.info: TaskInfo = info if info is not None else model.info
        self.backend: Backend = backend if backend is not None else TorchBackend(model)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", backend: str = "torch") -> Predictor:
        """``backend="torch"``: a model or run folder; ``"onnx"``: an export folder (``mmsenti export``; a run folder
        whose export is in ``RUN/onnx`` also works), run by onnxruntime on the CPU."""
        if backend == "onnx":
            from mmsenti.export.runtime import load_onnx_predictor

            return load_onnx_predictor(path)
        if backend != "torch":
            raise ValueError(f"unknown backend {backend!r} (known: torch, onnx)")
        model, processor, cfg = load_pretrained(path, resolve_device(device))
        predictor = cls(model, processor, cfg)
        predictor.source = Path(path)
        return predictor

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
        if not getattr(self.model if self.model is not None else self.backend, "supports_missing_modality", False):
            raise ValueError(f"model '{self.config.model.name}' with modalities {self.modalities} cannot predict "
                             "from a post that lacks one of them")
        self.processor.allow_missing = True

    # ----------------------------------------------------------------------------------------------- steps
    def preprocess(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """Samples (images as paths, PIL images or already transformed tensors) → the batch of model inputs."""
        for s in samples:  # a clear error instead of the tokenizer's, deep inside the batch
            problem = text_problem(s.text) if isinstance(s.text, str) else None
            if problem:
                raise DataError(f"post {s.id}: its text {problem}")
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

    def explain(self, text: str | None = None, image: Any = None, options=None, neighbour_samples=None,
                post_id: str = "0", **kwargs):
        """Why the model predicts what it does for one post: an :class:`mmsenti.explain.Explanation` (modality
        attribution and Integrated Gradients for every model; INFIG's word → region maps; RAHP's neighbours).

        Args:
            options: an :class:`mmsenti.explain.ExplainOptions`, or its fields as keyword arguments.
            neighbour_samples: RAHP: the training samples by id (their texts are listed with the neighbours).
        """
        from mmsenti.explain.core import explain
        from mmsenti.explain.options import ExplainOptions

        if self.model is None:  # gradients and attention need the PyTorch modules, not an ONNX graph
            raise ValueError("explanations need the PyTorch model; this predictor runs an ONNX export "
                             "(load the run or model folder with backend='torch')")
        options = options or ExplainOptions(**kwargs)
        return explain(self, Sample(id=post_id, label=None, text=text, image=image), options, neighbour_samples)

    def predict_samples(self, samples: Sequence[Sample], batch_size: int = 64) -> list[dict]:
        results: list[dict] = []
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            rows = self.decode(self.run(self.preprocess(chunk)))
            results += [{"id": s.id, **row} for s, row in zip(chunk, rows, strict=True)]
        return results


@dataclass(frozen=True)
class ModelRef:
    """Which model answers: what ``GET /v1/model`` and every row of ``mmsenti predict --input`` name."""

    name: str  # the run folder's name (an export's: its source model's), unless the caller names it
    version: str  # the first 12 hex digits of the weights' SHA-256 (model.safetensors; model.onnx for an export)
    directory: Path  # the model folder (or the export's)
    run_dir: Path  # the run holding the model folder (metrics.json), else the folder itself

    @classmethod
    def of(cls, predictor: Predictor, path: str | Path | None = None, name: str | None = None) -> ModelRef:
        """The model ``predictor`` runs, loaded from ``path`` (default: where ``load_model`` found it)."""
        export = getattr(predictor.backend, "meta", None)  # an ONNX export: its own folder and copy of the metrics
        path = path if path is not None else predictor.source
        if not export and path is None:
            raise ValueError("this predictor does not know the folder it was loaded from: pass it")
        backend: Any = predictor.backend
        directory = backend.directory if export else resolve_model_dir(path)  # type: ignore[arg-type]
        run_dir = directory.parent if directory.name == "model" and not export else directory
        version = file_sha256(backend.path if export else directory / "model.safetensors")[:12]
        return cls(name or (export["source"]["name"] if export else run_dir.name), version, directory, run_dir)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


def check_per_post(model_config: Any, what: str, error: type[Exception] = DataError) -> None:
    """Refuse a model whose answer for a post depends on the other posts of its batch: raise ``error`` saying it
    cannot be ``what`` ("served", "exported", ...), and why, in one line.

    RAHP with ``retrieval: in-batch`` retrieves its neighbours among its batch-mates: the service batches the posts
    of different clients, batch prediction regroups rows by length, an explanation's Integrated Gradients batch
    interpolated copies of one post, and an exported graph has no batch to retrieve from. Evaluation (whole splits
    in the training's batches) is where such a model is meant to be scored. Every command that needs per-post
    answers calls this, so the rule and its message live here only.
    """
    if getattr(model_config, "name", None) == "rahp" and getattr(model_config, "retrieval", None) == "in-batch":
        raise error(f"rahp with model.retrieval=in-batch cannot be {what}: its neighbours are the other posts of the "
                    "batch a post is predicted in, so its answer depends on that batch; train with "
                    "model.retrieval=bank (a memory bank saved with the model) or none")


def load_model(path: str | Path, device: str = "auto", backend: str = "torch") -> Predictor:
    """Load a trained model (a model directory or a training run directory) for prediction; ``backend="onnx"``
    loads its ONNX export instead (see :meth:`Predictor.from_pretrained`)."""
    return Predictor.from_pretrained(path, device, backend)
