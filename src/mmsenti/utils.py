"""Small shared utilities: files (atomic writes, JSON, hashes), seeding, RNG state, devices, batches, precision,
git revision, logging set-up.

torch is imported by the functions that use it, so the CLI can set up logging without importing torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsenti.errors import ModelFileError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mmsenti")


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename: a kill never leaves a half-written file
    (a half ``config.json`` would make a run folder unreadable for ``--resume`` and the experiment runner)."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, what: str = "JSON file") -> Any:
    """A JSON file of a model or export folder; missing or invalid is a :class:`ModelFileError` naming it (and
    line:column)."""
    if not path.is_file():
        raise ModelFileError(f"{path}: missing (the model folder is incomplete)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); the {what} is damaged") from None
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{path}: not UTF-8 text (byte offset {e.start}); the {what} is damaged") from None


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", **options: Any) -> str:
    """Hex digest of a file's bytes, read in 4 MiB chunks; ``options`` go to :func:`hashlib.new` (e.g.
    ``digest_size=16`` for BLAKE2b)."""
    h = hashlib.new(algorithm, **options)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


_sha256_memo: dict[tuple[str, int, int], str] = {}
_sha256_lock = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) so repeated cache-key lookups are free."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _sha256_lock:
        if key in _sha256_memo:
            return _sha256_memo[key]
    digest = file_digest(path)
    with _sha256_lock:
        _sha256_memo[key] = digest
    return digest


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The state of every RNG (python, numpy, torch, CUDA) as tensors and plain values.

    Tensors, ints, floats, strings and None only, so a checkpoint holding it loads with ``torch.load(...,
    weights_only=True)``: reading a run folder never needs the full unpickler (which can run code).
    """
    import torch

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    import torch

    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when it is available, else the CPU; any other name is taken as torch names it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def move(batch: dict, device: torch.device) -> dict:
    """A batch dict with its tensors on ``device`` (other values as they are)."""
    import torch

    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision: ``auto`` is bf16/fp16 on CUDA and fp32 on CPU, where bf16 runs only when asked for: it is
    fast on CPUs with bf16 dot-product instructions (AVX512-BF16, AMX) and far slower than fp32 on plain AVX2."""
    import torch

    if device.type != "cuda":
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # CPU flash attention's bf16 backward is about 10x slower than the math path (bf16 matmuls + softmax).
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type="cpu", dtype=dtype))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack
    return torch.autocast(device_type=device.type, dtype=dtype)


def git_revision() -> str | None:
    """The source tree's git revision (with -dirty when modified), or None outside a checkout."""
    root = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (a notebook or a test may swap it), not the
    stream that was current when logging was set up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO, logfile: Path | None = None) -> None:
    """Log to stderr (and a run's log file). Idempotent: calling again swaps the file handler."""
    root = logging.getLogger("mmsenti")
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in [h for h in root.handlers if getattr(h, "_mmsenti", None) == "file"]:
        root.removeHandler(h)
        h.close()
    if not any(getattr(h, "_mmsenti", None) == "stream" for h in root.handlers):
        sh = _StderrHandler()
        sh.setFormatter(fmt)
        # Records logged with extra={"file_only": True} (an error the CLI prints itself) go to the log file only.
        sh.addFilter(lambda record: not getattr(record, "file_only", False))
        sh._mmsenti = "stream"  # type: ignore[attr-defined]
        root.addHandler(sh)
    if logfile is not None:
        fh = logging.FileHandler(logfile)
        fh.setFormatter(fmt)
        fh._mmsenti = "file"  # type: ignore[attr-defined]
        root.addHandler(fh)


def show_progress(quiet: bool) -> bool:
    """tqdm bars only for an interactive terminal."""
    return not quiet and sys.stderr.isatty() and os.environ.get("CI") is None
