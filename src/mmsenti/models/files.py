"""The files of a saved model folder: a checksum manifest, and one-line errors for damaged or missing files.

:func:`write_manifest` records the size and SHA-256 of every file :func:`~mmsenti.models.base.save_pretrained`
wrote (``manifest.json``); :func:`verify_manifest` checks them before anything is parsed, so flipped bytes in the
weights are an error instead of a model that silently predicts differently. A folder without a manifest (saved by
an older mmsenti) loads with a warning. Every problem is a :class:`ModelFileError` (a
:class:`~mmsenti.data.base.DataError`: one line ``mmsenti: error: ...`` on the command line, exit 2) naming the file
and what is wrong with it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmsenti.errors import ModelFileError
from mmsenti.utils import file_sha256, read_json
from mmsenti.version import __version__

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


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


def read_config(directory: Path):
    """The resolved training config of a model folder (``config.json``)."""
    from mmsenti.config import ConfigError, build_config

    data = read_json(directory / "config.json", "model's config")
    if not isinstance(data, dict):
        raise ModelFileError(f"{directory / 'config.json'}: expected a JSON object")
    try:
        return build_config(data)
    except ConfigError as e:
        raise ModelFileError(f"{directory / 'config.json'}: {e}") from None


def read_labels(directory: Path) -> tuple[str, list[str] | None]:
    """``(task, label names)`` from ``labels.json``, checked."""
    path = directory / "labels.json"
    labels = read_json(path, "label file")
    if not isinstance(labels, dict) or labels.get("task") not in ("classification", "regression"):
        got = labels.get("task") if isinstance(labels, dict) else labels
        raise ModelFileError(f"{path}: 'task' must be classification or regression, got {got!r}")
    names = labels.get("label_names")
    if labels["task"] == "classification" and not (isinstance(names, list) and names and
                                                   all(isinstance(n, str) for n in names)):
        raise ModelFileError(f"{path}: 'label_names' must be a non-empty list of names, got {names!r}")
    return labels["task"], names if labels["task"] == "classification" else None


def load_weights(model, path: Path, device: str, strict: bool = True) -> None:
    """``safetensors`` weights into ``model``; an unreadable file or a key/shape mismatch names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not path.is_file():
        raise ModelFileError(f"{path}: missing (the model folder is incomplete)")
    try:
        load_model(model, str(path), strict=strict, device=device)
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({e}); the weights are damaged") from None
    except RuntimeError as e:  # missing / unexpected keys or shapes: weights of another architecture
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{path}: the weights do not fit the model config.json describes ({first[:300]})") from None
