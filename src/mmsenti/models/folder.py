"""The saved-model format: a model folder (or an ONNX export of one), written and read by :class:`ModelFolder`.

A trained model is a folder (a training run keeps it in ``RUN/model``)::

    config.json          the full resolved config (data, model, optim, run) it was trained with
    labels.json          task and label names
    model.safetensors    weights: only what eval-mode ``forward`` reads (training checkpoints keep the rest)
    preprocessing.json   + tokenizer/   what turns raw text/images into inputs: the model's input builders
    text_backbone/       the HF config of a pretrained text encoder (its architecture; weights are in the above)
    manifest.json        size and SHA-256 of every file above, verified before anything is parsed

Its ONNX export (``mmsenti export``; by default in ``RUN/onnx``) keeps the same config, labels and preprocessing
files, ``model.onnx`` in place of the weights, ``export.json`` (what the graph takes and returns, its parity
figures), the run's ``metrics.json`` and its own ``manifest.json``.

The manifest makes flipped bytes in the weights an error instead of a model that silently predicts differently; a
folder without one (saved by an older mmsenti) loads with a warning. Every problem is a :class:`ModelFileError` (a
:class:`~mmsenti.data.base.DataError`: one line ``mmsenti: error: ...`` on the command line, exit 2) naming the file
and what is wrong with it.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmsenti.errors import ModelFileError
from mmsenti.models.base import MultimodalModel, TaskInfo, build_model
from mmsenti.utils import file_sha256, read_json
from mmsenti.version import __version__

if TYPE_CHECKING:
    from mmsenti.config import Config
    from mmsenti.data.processing import Processor

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG = "config.json"
LABELS = "labels.json"
WEIGHTS = "model.safetensors"
TEXT_BACKBONE_DIR = "text_backbone"  # saved HF config of a pretrained text encoder
METRICS = "metrics.json"  # the run's scores of the model (a run folder's; copied into an export)
ONNX_FILE = "model.onnx"
EXPORT_FILE = "export.json"
MODEL_SUBDIR = "model"  # where a training run keeps its model folder
EXPORT_SUBDIR = "onnx"  # where `mmsenti export RUN` writes (RUN/onnx-int8 quantised) unless --out says otherwise
EXPORT_COPIES = (CONFIG, LABELS)  # from the model folder into its export, with the preprocessing's files
KINDS = ("torch", "onnx")  # a model folder with PyTorch weights, or its ONNX export


# ---------------------------------------------------------------------------------------------------- files
def _folder_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST and
                  not p.name.startswith("."))


def write_manifest(directory: str | Path) -> Path:
    """Record the size and SHA-256 of every file in ``directory`` (call it after everything else is written)."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _folder_files(directory)}
    path = directory / MANIFEST
    path.write_text(json.dumps({"format": "mmsenti-model", "mmsenti": __version__, "files": files}, indent=2) + "\n")
    return path


def verify_manifest(directory: str | Path) -> bool:
    """Check every file ``manifest.json`` lists (size, then SHA-256); returns False when there is no manifest."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        log.warning("%s: no %s (saved by an older mmsenti?): the files' checksums are not verified", directory,
                    MANIFEST)
        return False
    manifest = read_json(directory / MANIFEST, "checksum manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise ModelFileError(f"{directory / MANIFEST}: expected {{\"files\": {{name: {{size, sha256}}}}}}")
    for name, rec in files.items():
        path = directory / name
        if not path.is_file():
            raise ModelFileError(f"{path}: missing (listed in {MANIFEST}; the model folder is incomplete)")
        size = path.stat().st_size
        if size != rec.get("size"):
            raise ModelFileError(f"{path}: {size} bytes, but {rec.get('size')} when the model was saved (truncated "
                                 f"or damaged)")
        digest = file_sha256(path)
        if digest != rec.get("sha256"):
            raise ModelFileError(f"{path}: SHA-256 {digest[:16]}… differs from {str(rec.get('sha256'))[:16]}… "
                                 f"recorded when the model was saved: the file is damaged or was modified")
    return True


def read_config(directory: Path) -> Config:
    """The resolved training config of a model folder (``config.json``)."""
    from mmsenti.config import ConfigError, build_config

    data = read_json(directory / CONFIG, "model's config")
    if not isinstance(data, dict):
        raise ModelFileError(f"{directory / CONFIG}: expected a JSON object")
    try:
        return build_config(data)
    except ConfigError as e:
        raise ModelFileError(f"{directory / CONFIG}: {e}") from None


def read_labels(directory: Path) -> tuple[str, list[str] | None]:
    """``(task, label names)`` from ``labels.json``, checked."""
    path = directory / LABELS
    labels = read_json(path, "label file")
    if not isinstance(labels, dict) or labels.get("task") not in ("classification", "regression"):
        got = labels.get("task") if isinstance(labels, dict) else labels
        raise ModelFileError(f"{path}: 'task' must be classification or regression, got {got!r}")
    names = labels.get("label_names")
    if labels["task"] == "classification" and not (isinstance(names, list) and names and
                                                   all(isinstance(n, str) for n in names)):
        raise ModelFileError(f"{path}: 'label_names' must be a non-empty list of names, got {names!r}")
    return labels["task"], names if labels["task"] == "classification" else None


def read_export(directory: Path) -> dict[str, Any]:
    """``export.json`` of an ONNX export, checked to be one."""
    meta = read_json(directory / EXPORT_FILE, "export description")
    if not isinstance(meta, dict) or meta.get("format") != "onnx":
        raise ModelFileError(f"{directory / EXPORT_FILE}: expected an object with \"format\": \"onnx\"")
    return meta


# -------------------------------------------------------------------------------------------------- weights
def save_inference_weights(model: MultimodalModel, path: str | Path) -> None:
    """Write :meth:`MultimodalModel.inference_state_dict` as safetensors (tensors that share memory stored once,
    as ``safetensors.torch.save_model`` does, so ``load_model`` reads them back strictly)."""
    from safetensors.torch import _remove_duplicate_names, save_file

    state = model.inference_state_dict()
    metadata: dict[str, str] = {}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata[name] = kept
            del state[name]
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or None)


def load_inference_weights(model: MultimodalModel, path: str | Path, device: str | torch.device = "cpu") -> None:
    """Load saved weights strictly: every key of ``model`` present, nothing unexpected. A file written before
    saved models were lean also holds the training-only modules; those tensors (and only those) are skipped."""
    from safetensors import SafetensorError
    from safetensors.torch import _remove_duplicate_names, load_file

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: missing (the model folder is incomplete)")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({e}); the weights are damaged") from None
    drop = tuple(f"{name}." for name in model.training_only_modules())
    skipped = [k for k in state if drop and k.startswith(drop)]
    if skipped:
        log.info("%s: skipping %d training-only tensors (saved before models were lean)", path, len(skipped))
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing)
    unexpected = list(unexpected)
    # Tensors that share memory are stored once (see save_inference_weights): their other names are not missing.
    for group in _remove_duplicate_names(model.state_dict(), preferred_names=list(state)).values():
        for name in group:
            if name in missing:
                missing.remove(name)
            else:
                unexpected.append(name)
    if missing or unexpected:
        raise ModelFileError(f"{path}: the weights do not fit the model config.json describes (missing keys "
                             f"{sorted(missing)[:10]}, unexpected keys {sorted(unexpected)[:10]})")


# --------------------------------------------------------------------------------------------------- folder
@dataclass(frozen=True, eq=False)
class ModelFolder:
    """A model folder or its ONNX export, read once: checksums, config, labels, preprocessing (and ``export.json``).

    :meth:`open` reads it; :meth:`load_model` builds the PyTorch model with its weights, while an export's graph
    (:attr:`weights`) is run by the onnxruntime backend. :attr:`name` and :attr:`version` say which model answers
    (``GET /v1/model`` and every row of ``mmsenti predict --input`` show them); :attr:`metrics` are the run's scores.
    :meth:`save` writes a trained model, :meth:`write_export` the files of its export around a graph.
    """

    directory: Path
    config: Config
    info: TaskInfo
    processor: Processor
    export: dict[str, Any] | None = None  # export.json of an ONNX export; None for a folder of PyTorch weights

    # ------------------------------------------------------------------------------------------- reading
    @staticmethod
    def find(path: str | Path, kind: str = "torch") -> Path:
        """The folder of ``kind`` at ``path``: ``path`` itself, or the one a run folder keeps (``RUN/model``,
        ``RUN/onnx``)."""
        path = Path(path)
        if kind == "onnx":
            for cand in (path, path / EXPORT_SUBDIR):
                if (cand / EXPORT_FILE).is_file():
                    return cand
            raise ModelFileError(f"{path}: not an ONNX export (no {EXPORT_FILE}); write one with "
                                 f"`mmsenti export {path} --format onnx [--out DIR]`")
        for cand in (path, path / MODEL_SUBDIR):
            # config.json + any other file of the format: a model folder, whose missing files are then named
            if (cand / CONFIG).is_file() and any((cand / f).is_file() for f in (
                    WEIGHTS, LABELS, "preprocessing.json", MANIFEST)):
                return cand
        raise ModelFileError(f"{path}: not a trained mmsenti model or run directory (no {WEIGHTS} + {CONFIG})")

    @classmethod
    def open(cls, path: str | Path, kind: str = "torch") -> ModelFolder:
        """Read the model folder (``kind="torch"``) or ONNX export (``"onnx"``) at ``path`` or in the run folder
        ``path``. The files' checksums are verified first; a damaged or missing file is a :class:`ModelFileError`
        naming it."""
        from mmsenti.data.processing import Processor

        if kind not in KINDS:
            raise ValueError(f"unknown backend {kind!r} (known: {', '.join(KINDS)})")
        directory = cls.find(path, kind)
        verify_manifest(directory)
        export = read_export(directory) if kind == "onnx" else None
        config = read_config(directory)
        info = TaskInfo(*read_labels(directory))
        return cls(directory, config, info, Processor.load(directory, config.model), export)

    @property
    def kind(self) -> str:
        return "torch" if self.export is None else "onnx"

    @property
    def weights(self) -> Path:
        """The file whose checksum is the version: ``model.safetensors``, or an export's ``model.onnx``."""
        return self.directory / (WEIGHTS if self.export is None else ONNX_FILE)

    @property
    def run_dir(self) -> Path:
        """The run holding the model folder (its ``metrics.json``), else the folder itself (an export's too)."""
        return self.directory.parent if self.export is None and self.directory.name == MODEL_SUBDIR else self.directory

    @property
    def name(self) -> str:
        """The run folder's name (an export's: that of the model it was exported from)."""
        return self.export["source"]["name"] if self.export is not None else self.run_dir.name

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.weights)  # remembered: verify_manifest has just hashed the file

    @property
    def version(self) -> str:
        """The first 12 hex digits of the weights' SHA-256 (of ``model.onnx`` for an export)."""
        return self.sha256[:12]

    def ref(self) -> dict[str, str]:
        """``{"name", "version"}``: what every answer names the model by."""
        return {"name": self.name, "version": self.version}

    @cached_property
    def metrics(self) -> dict | None:
        """The run's ``metrics.json`` (scores of the dev-selected model), when there is one."""
        path = self.run_dir / METRICS
        return json.loads(path.read_text()) if path.is_file() else None

    def load_model(self, device: str | torch.device = "cpu") -> MultimodalModel:
        """The model in eval mode, built for inference, with its weights loaded strictly."""
        if self.export is not None:
            raise ValueError(f"{self.directory}: an ONNX export has no PyTorch weights (onnxruntime runs its graph: "
                             "backend='onnx')")
        model_cfg = self.config.model
        if (self.directory / TEXT_BACKBONE_DIR / CONFIG).is_file():
            model_cfg = copy.deepcopy(model_cfg)
            model_cfg.text_encoder.pretrained = str(self.directory / TEXT_BACKBONE_DIR)  # architecture only
        model = build_model(model_cfg, self.info, self.processor, load_weights=False, inference=True)
        load_inference_weights(model, self.weights, device)
        return model.to(device).eval()

    # ------------------------------------------------------------------------------------------- writing
    @staticmethod
    def save(directory: str | Path, model: MultimodalModel, processor: Processor, config: Config) -> None:
        """Write a trained model as a model folder (the manifest last, over everything written)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (directory / LABELS).write_text(
            json.dumps({"task": model.info.task, "label_names": model.info.label_names}, indent=2) + "\n")
        processor.for_inference().save(directory)
        text = getattr(model, "text_encoder", None)
        if text is not None and config.model.text_encoder.name != "tiny-bert":
            # The exact architecture, so loading needs neither the pretrained weights nor the hub.
            text.backbone.config.save_pretrained(str(directory / TEXT_BACKBONE_DIR))
        save_inference_weights(model, directory / WEIGHTS)
        write_manifest(directory)  # last: it records the checksums of whatever was written above

    def write_export(self, directory: Path, meta: dict[str, Any]) -> None:
        """Complete an export folder whose graph (``model.onnx``) is written: this folder's preprocessing files,
        the run's metrics, ``export.json`` (``meta`` and the graph files' sizes) and the manifest."""
        for name in (*EXPORT_COPIES, *self.processor.files()):
            src = self.directory / name
            if src.is_dir():
                shutil.copytree(src, directory / name)
            elif src.is_file():
                shutil.copy2(src, directory / name)
        if (self.run_dir / METRICS).is_file():
            shutil.copy2(self.run_dir / METRICS, directory / METRICS)
        meta["files"] = {p.name: p.stat().st_size for p in sorted(directory.glob(ONNX_FILE + "*"))}
        (directory / EXPORT_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        write_manifest(directory)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):  # parity figures computed with numpy
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
