"""mmsenti: multimodal sentiment analysis (image+text and text+audio+vision)."""

from __future__ import annotations

from mmsenti.compat import install_import_hook as _install_import_hook
from mmsenti.version import __version__

# transformers, timm and open_clip import torchvision whenever it is installed; on a CPU-only torch with a
# mismatched torchvision build that import fails unless the compatibility shim runs first. The hook runs the shim
# on the first `import torchvision` of the process, wherever it happens; `import mmsenti` itself stays light
# (no torch), so `mmsenti --help` starts in a fraction of a second.
_install_import_hook()

__all__ = ["__version__", "load_model", "create_model", "load_config", "MODELS", "DATASETS"]


def __getattr__(name: str):
    # Lazy: `import mmsenti` does not import transformers or the models until something is used.
    if name == "load_model":
        from mmsenti.inference import load_model

        return load_model
    if name == "create_model":
        from mmsenti.models.factory import create_model

        return create_model
    if name == "load_config":
        from mmsenti.config import load_config

        return load_config
    if name in ("MODELS", "DATASETS"):
        from mmsenti import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'mmsenti' has no attribute {name!r}")
