"""Frozen-feature cache: outputs of frozen backbone parts, computed once per dataset split, memory-mapped from disk.

When a model's image CNN is frozen, or its text encoder's lower layers are, those parts give the same output
every epoch, seed and ablation. The trainer then computes them once per split (:func:`build_store`), and later
batches read them from disk (:class:`CachedCollator`), so an epoch runs only the trainable layers and never
decodes an image.

An entry is a directory ``<cache_dir>/<key>/`` whose key hashes everything the features depend on:

* the frozen weights themselves (every frozen parameter and buffer of the modules producing the features),
* which features are stored (e.g. text hidden states 4, image feature map) and their dtype,
* the preprocessing (tokenizer vocabulary and max length, image transform),
* the data: the dataset's source files (content hash), each sample's id and text, and each image file's path,
  size and modification time (or pixels, for in-memory images).

Changing any of them gives a new key, hence a new entry. An entry is built in a temporary directory and renamed
into place only when complete, with a manifest of every file's size and BLAKE2 digest; an entry whose manifest
is missing or does not match its files (a killed build, a truncated or corrupted file) is never read: it is
removed and rebuilt.

Text features are ragged: one row per real (non-padding) token, so the cache holds no padding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmsenti.data.base import Sample
from mmsenti.errors import CacheError
from mmsenti.train.sampler import ordered_batches, sample_lengths
from mmsenti.utils import file_digest, move

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ENV_CACHE_DIR = "MMSENTI_CACHE_DIR"
MANIFEST = "manifest.json"  # written last: its presence (and agreement with the files) marks a complete entry


def default_cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """``configured`` (run.cache_dir), else ``$MMSENTI_CACHE_DIR``, else ``~/.cache/mmsenti/features``."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    return Path.home() / ".cache" / "mmsenti" / "features"


# ------------------------------------------------------------------------------------------------- hashing
def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def module_fingerprint(module: nn.Module) -> str:
    """Hash of a module's frozen state: every parameter that does not train, and every buffer."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__name__.encode())
    for name, p in module.named_parameters():
        if not p.requires_grad:
            h.update(name.encode())
            _update_tensor(h, p)
    for name, b in module.named_buffers():
        h.update(name.encode())
        _update_tensor(h, b)
    return h.hexdigest()


def _digest(path: str | os.PathLike) -> str:
    """BLAKE2b-128 of a file's bytes: what the entries' manifests on disk record."""
    return file_digest(path, "blake2b", digest_size=16)


def processor_fingerprint(processor) -> list[dict[str, Any]]:
    """What of the preprocessing determines cached features: each input builder's fingerprint (tokenizer and
    maximum length, image transform, ...)."""
    return processor.fingerprint()


def data_fingerprint(samples: Sequence[Sample], sources: Iterable[str | os.PathLike] = ()) -> str:
    """Hash of a split's content: source files, sample ids and texts, image files (path, size, mtime) or pixels."""
    h = hashlib.blake2b(digest_size=16)
    for src in sorted(str(s) for s in sources):
        p = Path(src)
        h.update(src.encode())
        h.update(_digest(p).encode() if p.is_file() else b"-")
    for s in samples:
        h.update(f"\x00{s.id}\x01{s.text}\x02".encode())
        img = s.image
        if img is None:
            continue
        if isinstance(img, (str, os.PathLike)):
            try:
                st = os.stat(img)
                h.update(f"{img}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{img}|missing".encode())
        elif hasattr(img, "tobytes"):  # an in-memory PIL image (generated datasets)
            h.update(img.tobytes())
    return h.hexdigest()


def cache_key(model, processor, samples: Sequence[Sample], sources: Iterable[str | os.PathLike] = (),
              dtype: str = "float32") -> tuple[str, dict[str, Any]]:
    """The key of a split's entry and the parts it hashes (kept in the entry's metadata for ``cache info``)."""
    parts = {
        "version": CACHE_VERSION,
        "spec": model.cache_spec(),
        "weights": {name: module_fingerprint(m) for name, m in model.cache_modules().items()},
        "preprocessing": processor_fingerprint(processor),
        "data": data_fingerprint(samples, sources),
        "dtype": dtype,
    }
    key = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()
    return key, parts


# ------------------------------------------------------------------------------------------------ entries
def verify_entry(directory: str | os.PathLike, check_digests: bool = True) -> str | None:
    """None if the entry is complete and intact, else what is wrong with it."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "incomplete (no manifest: the build did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {info['size']} (truncated?)"
        if check_digests and _digest(path) != info["digest"]:
            return f"{name} does not match its digest (corrupted)"
    return None


class FeatureStore:
    """A complete, verified entry (read-only, memory-mapped); :meth:`gather` returns a batch's features."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.ids: list[str] = json.loads((self.directory / "ids.json").read_text())
        self.row_of = {s: i for i, s in enumerate(self.ids)}
        self.features: dict[str, dict[str, Any]] = self.meta["features"]
        self._arrays: dict[str, np.ndarray] | None = None
        self.lengths = np.load(self.directory / "lengths.npy") if (self.directory / "lengths.npy").is_file() else None
        self.offsets = None if self.lengths is None else np.concatenate([[0], np.cumsum(self.lengths)])

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self):  # DataLoader workers re-open the memory maps instead of copying them
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {
                k: np.memmap(self.directory / f"{k}.bin", dtype=f["dtype"], mode="r", shape=tuple(f["shape"]))
                for k, f in self.features.items()
            }
        return self._arrays

    def gather(self, ids: Sequence[str], attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Features of ``ids`` as float32 tensors; token features are zero-padded to ``attention_mask``'s length."""
        try:
            rows = [self.row_of[str(i)] for i in ids]
        except KeyError as e:
            raise CacheError(f"feature cache {self.directory.name}: sample {e.args[0]} is not in it") from None
        out = {}
        for k, f in self.features.items():
            arr = self.arrays[k]
            if f["kind"] == "fixed":
                out[k] = torch.from_numpy(np.stack([arr[r] for r in rows]).astype(np.float32))
                continue
            if attention_mask is None:
                raise CacheError(f"feature cache: '{k}' holds text tokens, but the batch has no attention_mask")
            real = attention_mask.bool().cpu()
            n = real.sum(1).numpy()
            wrong = np.flatnonzero(self.lengths[rows] != n)
            if len(wrong):
                j = int(wrong[0])
                raise CacheError(f"feature cache {self.directory.name}: sample {ids[j]} has {self.lengths[rows[j]]} "
                                 f"cached tokens but tokenizes to {n[j]}; run `mmsenti cache clear`")
            # One read of every real token's row, scattered into the padded batch in one go: the mask's True
            # positions in row-major order are each sample's tokens in order, as the build stored them.
            index = np.concatenate([np.arange(self.offsets[r], self.offsets[r] + m)
                                    for r, m in zip(rows, n, strict=True)])
            t = torch.zeros(len(rows), attention_mask.shape[1], arr.shape[1])
            t[real] = torch.from_numpy(np.asarray(arr[index], dtype=np.float32))
            out[k] = t
        return out


def build_store(directory: str | os.PathLike, model, batches: Iterable[dict[str, Any]], spec: dict[str, str],
                meta: dict[str, Any], dtype: str = "float32", device: torch.device | str = "cpu",
                total: int | None = None, progress: bool = False) -> FeatureStore:
    """Compute ``model.compute_cached`` over ``batches`` and write a complete entry at ``directory`` atomically."""
    from tqdm.auto import tqdm

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{directory.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed earlier build
    tmp = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    tmp.mkdir()
    files = {k: open(tmp / f"{k}.bin", "wb") for k in spec}
    shapes: dict[str, list[int]] = {}
    rows = {k: 0 for k in spec}
    ids: list[str] = []
    lengths: list[int] = []
    np_dtype = np.dtype(dtype)
    was_training = model.training
    model.eval()
    t0 = time.time()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc=f"caching {meta.get('split', '')}", disable=not progress,
                              leave=False):
                batch = move(batch, device)
                feats = model.compute_cached(batch)
                ids.extend(str(i) for i in batch["ids"])
                if "attention_mask" in batch and any(v == "tokens" for v in spec.values()):
                    lengths.extend(batch["attention_mask"].sum(1).tolist())
                for k, kind in spec.items():
                    x = feats[k].float().cpu()
                    if kind == "tokens":
                        m = batch["attention_mask"].bool().cpu()
                        x = torch.cat([x[j, m[j]] for j in range(x.shape[0])])  # real tokens only
                    arr = x.numpy().astype(np_dtype, copy=False)
                    shapes.setdefault(k, list(arr.shape[1:]))
                    if list(arr.shape[1:]) != shapes[k]:
                        raise CacheError(f"feature '{k}' changes shape across batches: {shapes[k]} vs "
                                         f"{list(arr.shape[1:])} (images must all be resized to one size)")
                    arr.tofile(files[k])
                    rows[k] += arr.shape[0]
        for f in files.values():
            f.close()
        features = {k: {"kind": spec[k], "dtype": dtype, "shape": [rows[k], *shapes.get(k, [])]} for k in spec}
        (tmp / "meta.json").write_text(json.dumps({**meta, "features": features, "num_samples": len(ids),
                                                   "created": time.strftime("%F %T")}, indent=1, default=str))
        (tmp / "ids.json").write_text(json.dumps(ids))
        if lengths:
            np.save(tmp / "lengths.npy", np.asarray(lengths, dtype=np.int64))
        manifest = {"files": {p.name: {"size": p.stat().st_size, "digest": _digest(p)}
                              for p in sorted(tmp.iterdir())}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    size = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
    log.info("feature cache: %s %d samples, %.1f MB in %.1fs → %s", meta.get("split", ""), len(ids), size,
             time.time() - t0, directory)
    return FeatureStore(directory)


def open_or_build(root: str | os.PathLike, model, processor, samples: Sequence[Sample], *,
                  sources: Iterable[str | os.PathLike] = (), meta: dict[str, Any] | None = None,
                  dtype: str = "float32", device: torch.device | str = "cpu", batch_size: int = 64,
                  progress: bool = False) -> FeatureStore:
    """The verified entry of ``samples`` for ``model``'s frozen parts, building (or rebuilding) it when needed."""
    spec = model.cache_spec()
    key, parts = cache_key(model, processor, samples, sources, dtype)
    directory = Path(root) / key
    with _build_lock(directory):  # runs side by side (`mmsenti experiment run --lanes`) wait for one builder
        return _open_or_build(directory, model, processor, samples, spec, parts, meta, dtype, device, batch_size,
                              progress)


@contextlib.contextmanager
def _build_lock(directory: Path):
    """An exclusive lock on ``<directory>.lock`` (POSIX; elsewhere none): one process checks and builds an entry
    while others wait, instead of deleting each other's partial builds."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open_or_build(directory: Path, model, processor, samples, spec, parts, meta, dtype, device, batch_size,
                   progress) -> FeatureStore:
    if directory.exists():
        problem = verify_entry(directory)
        if problem is None:
            store = FeatureStore(directory)
            if len(store) == len(samples):
                log.info("feature cache: using %s (%d samples)", directory, len(store))
                return store
            problem = f"holds {len(store)} samples, expected {len(samples)}"
        log.warning("feature cache %s is unusable (%s): rebuilding it", directory, problem)
        shutil.rmtree(directory, ignore_errors=True)
    # Rows are found by id, so the entry may be built in any order: longest first pads least.
    order = ordered_batches(len(samples), batch_size, sample_lengths(processor, samples))
    batches = (processor([samples[i] for i in b]) for b in order)
    return build_store(directory, model, batches, spec, {**(meta or {}), "key_parts": parts}, dtype, device,
                       total=len(order), progress=progress)


class CachedCollator:
    """Collate samples with the processor, skipping what the cache replaces (its builders build nothing for those
    keys: an image that only they read is never decoded), and add the cached features."""

    def __init__(self, processor, store: FeatureStore, replaces: set[str]):
        self.processor, self.store, self.replaces = processor, store, set(replaces)

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        batch = self.processor(samples, without=self.replaces)
        for k in self.replaces:  # whatever a builder made anyway
            batch.pop(k, None)
        batch.update(self.store.gather(batch["ids"], batch.get("attention_mask")))
        return batch


# ------------------------------------------------------------------------------------------- maintenance
def list_entries(root: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per entry (partial builds included): key, status, size and what it holds."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        row: dict[str, Any] = {"key": d.name, "path": str(d), "size_mb": size / 2**20}
        if d.name.startswith("."):
            row["status"] = "partial (killed build)"
        else:
            problem = verify_entry(d, check_digests=False)
            row["status"] = "complete" if problem is None else problem
        meta_path = d / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            row.update({k: meta.get(k) for k in ("dataset", "split", "model", "num_samples", "created")})
            row["features"] = ", ".join(meta.get("features", {}))
        out.append(row)
    return out


def clear_entries(root: str | os.PathLike, keys: Sequence[str] = ()) -> int:
    """Remove the given entries (key prefixes), or all of them; returns how many were removed."""
    root = Path(root)
    removed = 0
    for row in list_entries(root):
        if not keys or any(row["key"].lstrip(".").startswith(k) for k in keys):
            shutil.rmtree(row["path"], ignore_errors=True)
            removed += 1
    return removed
