"""Running an exported model: the onnxruntime backend of :class:`~mmsenti.inference.Predictor`.

``mmsenti.load_model(EXPORT_DIR, backend="onnx")`` (and ``mmsenti predict/serve --backend onnx``) reads an export
folder written by ``mmsenti export`` (:class:`~mmsenti.models.folder.ModelFolder`): the same preprocessing files as
the PyTorch model folder (so posts are tokenized and transformed exactly as before) and ``model.onnx`` in place of
the weights; only the model call of the predictor changes (:class:`OnnxBackend`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mmsenti.export.format import PRESENT_KEYS, ExportError

log = logging.getLogger(__name__)

_NUMPY = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(bool)": np.bool_}


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"the onnx backend needs onnxruntime ({e}): pip install 'mmsenti[onnx]'") from None
    return onnxruntime


class OnnxBackend:
    """An ONNX graph in an onnxruntime session: a batch of tensors → (B, num_outputs) logits.

    Args:
        path: the ``model.onnx`` file.
        threads: intra-op threads (default: onnxruntime's choice, one per physical core).
        providers: onnxruntime execution providers (default: the CPU).
    """

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 4  # a failed run raises with its message; no warnings on every load
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options, providers=providers or ["CPUExecutionProvider"])
        self.inputs = [(i.name, _NUMPY.get(i.type)) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # The graph takes image_present / text_present flags: it can hide a modality (--allow-missing-modality).
        self.supports_missing_modality = any(name in PRESENT_KEYS for name, _ in self.inputs)

    def feed(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """The graph's inputs from a batch dict (torch tensors or arrays); absent present-flags mean 'present'."""
        size = next(len(v) for v in batch.values() if hasattr(v, "shape"))
        out = {}
        for name, dtype in self.inputs:
            value = batch.get(name)
            if value is None:
                if name not in PRESENT_KEYS:
                    raise ValueError(f"the exported graph needs '{name}', the batch has {sorted(batch)}")
                value = np.ones(size, dtype=np.bool_)
            arr = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
            out[name] = np.ascontiguousarray(arr, dtype=dtype) if dtype is not None else arr
        return out

    def run_outputs(self, batch: dict[str, Any], names: list[str]) -> list[np.ndarray]:
        return self.session.run(names, self.feed(batch))

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        return self.session.run(["logits"], self.feed(batch))[0]
