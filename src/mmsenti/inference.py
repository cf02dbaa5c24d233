"""Prediction with a trained model, in Python (``mmsenti.load_model``), for the CLI and for the service.

A :class:`Predictor` runs three separate steps, so each can be replaced on its own:

1. :meth:`Predictor.preprocess` — samples → a batch dict of tensors (the processor's evaluation inputs);
2. :meth:`Predictor.run` — batch → logits, through a *backend* (:class:`TorchBackend`, or onnxruntime running an
   exported graph: :class:`mmsenti.export.OnnxBackend`, ``backend="onnx"``); only this step differs between them;
3. :meth:`Predictor.decode` — logits → a :class:`Prediction` per post: label + probabilities (or a score).

:meth:`Predictor.from_pretrained` chooses the backend: both read the folder with
:class:`~mmsenti.models.folder.ModelFolder`, which also names the model (name and version) for every answer.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mmsenti.data.base import DataError, Sample, text_problem
from mmsenti.models.base import TaskInfo, check_per_post
from mmsenti.models.folder import ModelFolder
from mmsenti.utils import move, resolve_device

# check_per_post lives with the models now; named here too, where the docs named it before.
__all__ = ["Backend", "Prediction", "Predictor", "TorchBackend", "check_per_post", "load_model"]


@dataclass(repr=False)
class Prediction(Mapping[str, Any]):
    """One post's answer, the same object wherever it is asked for: :meth:`Predictor.predict`, ``mmsenti predict``
    (a JSON line per input row, with the model's name and version) and ``POST /v1/predict`` (whose response schema
    is derived from these fields). Written as :meth:`to_dict`: the fields that are set, in this order.

    It also reads as that dict (``prediction["label"]``, ``"score" in prediction``), as predictions did before
    they had a type.
    """

    id: str
    line: int | None = field(default=None, metadata={"doc": "batch prediction: the input file's line of a row that "
                                                            "was not predicted"})
    label: str | None = field(default=None, metadata={"doc": "classification: the most probable label"})
    probabilities: dict[str, float] | None = field(default=None, metadata={
        "doc": "classification: probability per label"})
    score: float | None = field(default=None, metadata={"doc": "regression: the predicted score"})
    modalities: list[str] | None = field(default=None, metadata={"doc": "the modalities the prediction read"})
    error: str | None = field(default=None, metadata={"doc": "batch prediction: why the row was not predicted"})

    def to_dict(self, exclude: Collection[str] = ()) -> dict[str, Any]:
        """The fields that are set (not None), in declaration order, less ``exclude``."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None and f.name not in exclude}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __repr__(self) -> str:
        return f"Prediction({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


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
        # Prediction(id='0', label='positive', probabilities={'negative': 0.01, 'neutral': 0.02, 'positive': 0.97})
    """

    def __init__(self, model, processor, config, backend: Backend | None = None, info: TaskInfo | None = None,
                 folder: ModelFolder | None = None):
        """``model`` may be None when a ``backend`` runs the model elsewhere (an ONNX graph); ``info`` then says
        its task and labels. ``folder``: the folder it was loaded from (it names the model's answers)."""
        self.model, self.processor, self.config = model, processor, config
        self.info: TaskInfo = info if info is not None else model.info
        self.backend: Backend = backend if backend is not None else TorchBackend(model)
        self.folder = folder

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", backend: str = "torch",
                        threads: int | None = None) -> Predictor:
        """``backend="torch"``: a model or run folder; ``"onnx"``: an export folder (``mmsenti export``; a run folder
        whose export is in ``RUN/onnx`` also works), run by onnxruntime on the CPU with ``threads`` intra-op threads
        (default: onnxruntime's choice)."""
        folder = ModelFolder.open(path, backend)
        if folder.kind == "onnx":
            from mmsenti.export.runtime import OnnxBackend

            return cls(None, folder.processor, folder.config, backend=OnnxBackend(folder.weights, threads),
                       info=folder.info, folder=folder)
        return cls(folder.load_model(resolve_device(device)), folder.processor, folder.config, folder=folder)

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

    def decode(self, logits: np.ndarray, ids: Sequence[str]) -> list[Prediction]:
        """Logits → the :class:`Prediction` of each post (``ids`` in the batch's order): label + probabilities
        (classification, rounded to 6 decimals) or score (regression)."""
        if self.info.task == "regression":
            return [Prediction(i, score=float(row[0])) for i, row in zip(ids, logits, strict=True)]
        probs = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=-1).numpy()
        names = self.label_names
        return [Prediction(i, label=names[int(p.argmax())],
                           probabilities={n: round(float(v), 6) for n, v in zip(names, p, strict=True)})
                for i, p in zip(ids, probs, strict=True)]

    # -------------------------------------------------------------------------------------------- shortcuts
    def predict(self, text: str | None = None, image: Any = None, tags: Sequence[str] | None = None) -> Prediction:
        """Predict one post; ``image`` is a path or a PIL image; ``tags`` are what a ``tags`` image encoder reads."""
        return self.predict_samples([Sample(id="0", label=None, text=text, image=image,
                                            tags=list(tags) if tags is not None else None)])[0]

    def explain(self, text: str | None = None, image: Any = None, options=None, neighbour_samples=None,
                post_id: str = "0", tags: Sequence[str] | None = None, **kwargs):
        """Why the model predicts what it does for one post: an :class:`mmsenti.explain.Explanation` (modality
        attribution and Integrated Gradients for every model; INFIG's word → region maps, or word → tag maps when
        it reads the image as ``tags``; RAHP's neighbours).

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
        sample = Sample(id=post_id, label=None, text=text, image=image, tags=list(tags) if tags is not None else None)
        return explain(self, sample, options, neighbour_samples)

    def predict_samples(self, samples: Sequence[Sample], batch_size: int = 64) -> list[Prediction]:
        results: list[Prediction] = []
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            results += self.decode(self.run(self.preprocess(chunk)), [s.id for s in chunk])
        return results


def load_model(path: str | Path, device: str = "auto", backend: str = "torch", threads: int | None = None
               ) -> Predictor:
    """Load a trained model (a model directory or a training run directory) for prediction; ``backend="onnx"``
    loads its ONNX export instead (see :meth:`Predictor.from_pretrained`)."""
    return Predictor.from_pretrained(path, device, backend, threads)
