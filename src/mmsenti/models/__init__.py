"""Every registered model. Importing this package imports each of its modules (and those of its subpackages),
whose ``@MODELS.register`` decorators fill :data:`mmsenti.registry.MODELS` (as ``timm.models`` does): a new model is
one new module, listed nowhere else. A module that fails to import makes ``import mmsenti.models`` fail with its
error.
"""

import importlib
import pkgutil


def _import_all(path, prefix: str) -> None:
    for info in pkgutil.iter_modules(path, prefix):
        module = importlib.import_module(info.name)
        if info.ispkg:
            _import_all(module.__path__, info.name + ".")


_import_all(__path__, __name__ + ".")
