"""Import torchvision, timm and open_clip on a torch whose torchvision build does not match it.

torchvision ships compiled operators (``torchvision::nms``, ``roi_align``, ...) in ``torchvision/_C.so``. When
that library cannot be loaded (a CUDA torchvision wheel next to a CPU-only torch, say), torchvision degrades
gracefully for most ops but still registers a fake (meta) kernel for ``torchvision::nms`` and ``qnms`` at import
time, which fails with ``RuntimeError: operator torchvision::nms does not exist``. timm and open_clip import
torchvision, so they fail too, although mmsenti needs none of the compiled ops (only model definitions).

:func:`import_torchvision` retries such a failed import after defining the missing operator *schemas* with
:mod:`torch.library`, each with a kernel that raises :class:`TorchvisionOpsUnavailable`: the import works and
calling one of those ops fails with a message that says why, rather than with a dispatcher error. When
torchvision's ops load fine, nothing is defined and all three functions are plain imports.

Every mmsenti module that needs torchvision, timm or open_clip imports them through this module, and
``import mmsenti`` installs :func:`install_import_hook`: a ``sys.meta_path`` finder that routes the process's first
``import torchvision`` (by transformers, timm, open_clip or user code) through :func:`import_torchvision`. So the
shim runs exactly when something first needs torchvision, and ``import mmsenti`` itself imports neither torch nor
torchvision (start-up stays fast for ``mmsenti --help`` and ``mmsenti list``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import threading
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Schemas of the ops torchvision registers unconditionally at import time (``_meta_registrations``); read off
# torchvision's C++ op definitions. An op missing from here that a future torchvision needs at import time
# makes the import fail with an ImportError naming it.
_TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")

_lock = threading.Lock()
# A torch.library.Library unregisters its definitions when garbage-collected, so it must live as long as the
# process; None until (and unless) the compatibility shim was needed.
_stub_lib: torch.library.Library | None = None
_stubbed_ops: list[str] = []


class TorchvisionOpsUnavailable(RuntimeError):
    """A compiled torchvision operator was called, but torchvision's compiled ops could not be loaded."""


def _unavailable_kernel(op: str):
    def kernel(*args, **kwargs):
        import torch

        raise TorchvisionOpsUnavailable(
            f"torchvision::{op} has no kernel: torchvision's compiled ops (torchvision/_C) could not be loaded, "
            f"usually because torchvision {_torchvision_version()} was built for a different torch "
            f"({torch.__version__}). mmsenti defined the op's schema only so that torchvision, timm and open_clip "
            "import; install the torchvision build that matches torch to use this op."
        )

    return kernel


def _torchvision_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchvision")
    except Exception:  # noqa: BLE001 - only used in an error message
        return "?"


def _define_stub(op: str) -> None:
    global _stub_lib
    import torch

    schema = _TORCHVISION_SCHEMAS.get(op)
    if schema is None:
        raise ImportError(
            f"torchvision failed to import: its compiled ops are unavailable and mmsenti has no stand-in schema for "
            f"torchvision::{op}; install the torchvision build that matches torch {torch.__version__}"
        )
    if _stub_lib is None:
        _stub_lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 - kept alive at module level
    _stub_lib.define(f"{op}{schema}")
    # CompositeExplicitAutograd covers every backend (CPU, CUDA, ...); torchvision adds the Meta kernel itself.
    _stub_lib.impl(op, _unavailable_kernel(op), "CompositeExplicitAutograd")
    _stubbed_ops.append(op)


def _forget_partial_import() -> None:
    # A failed package import leaves its already-imported submodules in sys.modules; drop them so the retry
    # re-executes torchvision/__init__ from a clean state.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """``import torchvision``, defining stand-ins for its compiled ops when they cannot be loaded.

    Returns:
        The torchvision module.

    Raises:
        ImportError: torchvision is not installed, or it fails for a reason this shim does not handle.
    """
    if "torchvision" in sys.modules and getattr(sys.modules["torchvision"], "__version__", None) is not None:
        return sys.modules["torchvision"]
    with _lock:
        _in_shim.active = True  # the import hook steps aside for the real import below
        try:
            for _ in range(len(_TORCHVISION_SCHEMAS) + 1):
                try:
                    return importlib.import_module("torchvision")
                except RuntimeError as e:
                    match = _MISSING_OP.search(str(e))
                    if match is None or match.group(1) in _stubbed_ops:
                        raise
                    _forget_partial_import()
                    log.debug("torchvision's compiled ops are unavailable; defining a stand-in for torchvision::%s",
                              match.group(1))
                    _define_stub(match.group(1))
            raise ImportError("torchvision failed to import after defining stand-ins for its compiled ops")
        finally:
            _in_shim.active = False


# ------------------------------------------------------------------------------------------- import hook
_in_shim = threading.local()


class _ShimLoader:
    """Loads ``torchvision`` by running :func:`import_torchvision`, then hands back the module it imported."""

    def __init__(self, real: ModuleSpec):
        self.real = real

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return import_torchvision()

    def exec_module(self, module: ModuleType) -> None:
        # importlib set __spec__ to the hook's spec; give the module back the spec of the file it came from.
        module.__spec__ = self.real


class _TorchvisionFinder:
    """``sys.meta_path`` entry: the first ``import torchvision`` anywhere goes through the compatibility shim.

    ``find_spec`` imports nothing (``importlib.util.find_spec("torchvision")``, which transformers calls to ask
    whether torchvision is installed, stays cheap); the shim runs when the module is actually loaded.
    """

    def find_spec(self, name: str, path=None, target=None) -> ModuleSpec | None:
        if name != "torchvision" or getattr(_in_shim, "active", False):
            return None
        real = PathFinder.find_spec(name, path)
        if real is None:
            return None
        spec = ModuleSpec(name, _ShimLoader(real), origin=real.origin, is_package=True)  # type: ignore[arg-type]
        spec.submodule_search_locations = real.submodule_search_locations
        spec.has_location = real.has_location
        return spec


def install_import_hook() -> None:
    """Route the first ``import torchvision`` of this process through :func:`import_torchvision` (idempotent)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())


def ensure_torchvision_importable() -> bool:
    """Make a later ``import torchvision`` succeed, wherever it happens; a no-op when torchvision is absent.

    ``transformers`` imports torchvision whenever it is installed (even for text models), so mmsenti calls this
    before importing ``transformers`` models. Returns whether torchvision is installed (and now imported).
    """
    if importlib.util.find_spec("torchvision") is None:
        return False
    import_torchvision()
    return True


def torchvision_ops_available() -> bool:
    """Whether torchvision's compiled ops (nms, roi_align, ...) work in this process (imports torchvision)."""
    import_torchvision()
    import torchvision.extension

    return bool(torchvision.extension._has_ops())


def stubbed_torchvision_ops() -> tuple[str, ...]:
    """Names of the ``torchvision::`` ops this module defined stand-ins for (empty when none were needed)."""
    return tuple(_stubbed_ops)


def import_timm() -> ModuleType:
    """``import timm`` (which imports torchvision) through :func:`import_torchvision`."""
    import_torchvision()
    return importlib.import_module("timm")


def import_open_clip() -> ModuleType:
    """``import open_clip`` (which imports timm and torchvision) through :func:`import_torchvision`."""
    import_torchvision()
    return importlib.import_module("open_clip")
