"""Atomic training checkpoints (model, optimiser, scheduler, step, RNG states, config).

A checkpoint holds tensors and plain values only (dicts, lists, numbers, strings, None; RNG states as tensors, see
:func:`mmsenti.utils.rng_state`), so it is read with ``torch.load(..., weights_only=True)``: a run folder copied
from elsewhere can hold a crafted ``last.pt``, and loading it must never run code. A file holding anything else
is refused with a :class:`CheckpointError` naming the objects it references.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from mmsenti.data.base import DataError

log = logging.getLogger(__name__)

# What the RNG state of a checkpoint written by mmsenti 0.1 references beyond tensors: numpy's uint32 array (array
# reconstruction only, no callable of the file's choosing). Such a file is read with exactly these allowed.
_LEGACY_NUMPY = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                 "numpy.dtype", "numpy.dtypes.UInt32DType"}


class CheckpointError(DataError):
    """A checkpoint that cannot be read, or that holds objects mmsenti refuses to unpickle."""


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


def _unsafe_globals(path: Path) -> list[str]:
    """The classes/functions a torch zip checkpoint references beyond weights_only's defaults (read, not run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint (a raw pickle, say): nothing to list
        return []


def _legacy_numpy_types() -> list:
    import numpy as np

    types: list = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            types.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
            break
        except (ImportError, AttributeError):
            continue
    if hasattr(np, "dtypes"):
        types.append(np.dtypes.UInt32DType)
    return types


def _convert_legacy_rng(ckpt: dict) -> dict:
    """mmsenti 0.1 stored ``random.getstate()`` and ``np.random.get_state()`` tuples; the new form is tensors."""
    rng = ckpt.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("python"), tuple):
        import numpy as np

        version, mt, gauss = rng["python"]
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        rng["python"] = {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss}
        rng["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return ckpt


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`atomic_save` without running code from it.

    Raises:
        CheckpointError: missing, damaged, or holding objects other than tensors and plain values (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {path}")
    try:
        with warnings.catch_warnings():  # a raw pickle (not torch's zip format) draws a protocol warning: noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(path)
    except Exception as e:  # noqa: BLE001 - any other failure means a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if unsafe and set(unsafe) <= _LEGACY_NUMPY:
        with torch.serialization.safe_globals(_legacy_numpy_types()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        log.info("%s: converted the RNG state of a checkpoint written by an older mmsenti", path)
        return _convert_legacy_rng(ckpt)
    what = f" (it references {', '.join(unsafe[:3])}{', ...' if len(unsafe) > 3 else ''})" if unsafe else ""
    raise CheckpointError(
        f"refused to load checkpoint {path}: it holds Python objects other than tensors and plain values{what}, "
        "and unpickling them could run code; mmsenti's own checkpoints never do, so this file was not written by "
        "mmsenti or was altered"
    )
