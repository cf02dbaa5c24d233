"""Atomic training checkpoints (model, optimiser, scheduler, step, RNG states, config).

A checkpoint holds tensors and plain values only (dicts, lists, numbers, strings, None; RNG states as tensors, see
:func:`mmsenti.utils.rng_state`), so it is read with ``torch.load(..., weights_only=True)``: a run folder copied
from elsewhere can hold a crafted ``last.pt``, and loading it must never run code. A file holding anything else
is refused with a :class:`CheckpointError` naming the objects it references.

The trainer's checkpoints are checksummed as model folders are: ``checkpoints/manifest.json`` records the size and
SHA-256 of each file, and :func:`load_checkpoint` verifies them before reading, so a flipped bit inside a tensor
(which torch's reader does not notice: it skips the zip CRCs) is an error naming the file, never a resumed run with
other weights. The manifest is updated around the atomic rename (the new file's checksum is added before the rename
and the old one dropped after it), so a kill at any moment leaves a file that verifies.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from mmsenti.errors import CheckpointError
from mmsenti.utils import file_digest
from mmsenti.version import __version__

log = logging.getLogger(__name__)

# What the RNG state of a checkpoint written by mmsenti 0.1 references beyond tensors: numpy's uint32 array (array
# reconstruction only, no callable of the file's choosing). Such a file is read with exactly these allowed.
_LEGACY_NUMPY = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                 "numpy.dtype", "numpy.dtypes.UInt32DType"}


MANIFEST = "manifest.json"  # in the checkpoints folder: {"files": {name: {"size", "sha256"[, "pending"]}}}


def atomic_save(obj: Any, path: str | Path, *, checksum: bool = False) -> None:
    """Write to a temp file in the same directory, fsync, then rename: a kill never leaves a half file.

    Args:
        checksum: record the file's size and SHA-256 in the folder's ``manifest.json`` (verified by
            :func:`load_checkpoint`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if checksum:
            record = {"size": Path(tmp).stat().st_size, "sha256": file_digest(tmp)}
            _record(path, record, pending=True)  # until the rename, the old file and the new one both verify
        os.replace(tmp, path)
        if checksum:
            _record(path, record)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_manifest(folder: Path) -> dict[str, dict] | None:
    """The ``files`` of ``folder/manifest.json``, or None when there is none; a damaged one is an error."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a checkpoint manifest ({e}); the file is damaged") from None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise CheckpointError(f"{path}: expected {{\"files\": {{name: {{size, sha256}}}}}}; the file is damaged")
    return files


def _record(path: Path, record: dict, pending: bool = False) -> None:
    """Write ``path``'s checksum into its folder's manifest (atomically); ``pending``: beside the current one."""
    try:
        files = _read_manifest(path.parent) or {}
    except CheckpointError:  # a damaged manifest is replaced: the files it listed are rewritten as training goes on
        files = {}
    if pending:
        files[path.name] = {**{k: v for k, v in files.get(path.name, {}).items() if k != "pending"},
                            "pending": record}
    else:
        files[path.name] = record
    text = json.dumps({"format": "mmsenti-checkpoints", "mmsenti": __version__, "files": files}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{MANIFEST}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path.parent / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify_checkpoint(path: str | Path) -> bool:
    """Check ``path`` against its folder's ``manifest.json`` (size, then SHA-256); False when it is not listed.

    Raises:
        CheckpointError: the file differs from what was written (one line naming it).
    """
    path = Path(path)
    files = _read_manifest(path.parent)
    rec = None if files is None else files.get(path.name)
    if rec is None:
        log.warning("%s: no checksum recorded in %s (written by an older mmsenti?): not verified", path, MANIFEST)
        return False
    written = [r for r in (rec, rec.get("pending")) if isinstance(r, dict) and "sha256" in r]
    size = path.stat().st_size
    if all(r.get("size") != size for r in written):
        raise CheckpointError(f"{path}: {size} bytes, but {rec.get('size')} when it was written (truncated or "
                              "damaged); resume from another copy of the run, or start it again")
    digest = file_digest(path)  # not the memoised file_sha256: a verification reads the bytes there now
    if all(r["sha256"] != digest for r in written):
        raise CheckpointError(f"{path}: SHA-256 {digest[:16]}… differs from {str(rec.get('sha256'))[:16]}… recorded "
                              f"in {MANIFEST} when it was written: the file is damaged or was modified; resume from "
                              "another copy of the run, or start it again")
    return True


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


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """Read a checkpoint written by :func:`atomic_save` without running code from it.

    Args:
        verify: check the checksum its folder's ``manifest.json`` records (:func:`verify_checkpoint`; a file
            without one loads with a warning).

    Raises:
        CheckpointError: missing, damaged, or holding objects other than tensors and plain values (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {path}")
    if verify:
        verify_checkpoint(path)
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
