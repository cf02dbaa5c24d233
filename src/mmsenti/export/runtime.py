"""Running an exported model: the onnxruntime backend of :class:`~mmsenti.inference.Predictor`.

``mmsenti.load_model(EXPORT_DIR, backend="onnx")`` (and ``mmsenti predict/serve --backend onnx``) reads an export
folder written by ``mmsenti export``: the same preprocessing files as the PyTorch model folder (so posts are
tokenized and transformed exactly as before) and ``model.onnx`` in place of the weights; only the model call of the
predictor changes (:class:`OnnxBackend`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mmsenti.export.format import DEFAULT_SUBDIR, EXPORT_FILE, ONNX_FILE, PRESENT_KEYS, ExportError

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
        meta: the folder's ``export.json`` (what the graph takes and returns, its parity figures), if known.
    """

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 meta: dict[str, Any] | None = None):
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 4  # a failed run raises with its message; no warnings on every load
        self.path = Path(path)
        self.directory, self.meta = self.path.parent, meta or {}
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


def find_export_dir(path: str | Path) -> Path:
    """An export folder (``export.json``), or a run/model folder holding one in ``onnx/``."""
    path = Path(path)
    for cand in (path, path / DEFAULT_SUBDIR):
        if (cand / EXPORT_FILE).is_file():
            return cand
    raise ExportError(f"{path}: not an ONNX export (no {EXPORT_FILE}); write one with "
                      f"`mmsenti export {path} --format onnx [--out DIR]`")


def read_export(directory: Path) -> dict[str, Any]:
    from mmsenti.errors import ModelFileError
    from mmsenti.utils import read_json

    meta = read_json(directory / EXPORT_FILE, "export description")
    if not isinstance(meta, dict) or meta.get("format") != "onnx":
        raise ModelFileError(f"{directory / EXPORT_FILE}: expected an object with \"format\": \"onnx\"")
    return meta


def load_onnx_predictor(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    """A :class:`~mmsenti.inference.Predictor` of an export folder, running ``model.onnx`` with onnxruntime.

    The folder's checksums (``manifest.json``) are verified first, as for a PyTorch model folder.
    """
    from mmsenti.data.processing import Processor
    from mmsenti.inference import Predictor
    from mmsenti.models.base import TaskInfo
    from mmsenti.models.files import read_config, read_labels, verify_manifest

    directory = find_export_dir(path)
    verify_manifest(directory)
    meta = read_export(directory)
    cfg = read_config(directory)
    task, label_names = read_labels(directory)
    backend = OnnxBackend(directory / ONNX_FILE, threads, providers, meta)
    return Predictor(None, Processor.load(directory), cfg, backend=backend, info=TaskInfo(task, label_names))
