"""Atomic training checkpoints (model, optimiser, scheduler, step, RNG states, config)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmsenti.data.base import DataError


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename: a kill never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint to resume from: {path}")
    try:
        # RNG states hold numpy arrays and tuples, so the full unpickler is needed; only load your own runs.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DataError(f"cannot read checkpoint {path}: {e}") from None
