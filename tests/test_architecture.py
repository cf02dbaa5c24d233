"""The layers of src/mmsenti hold (pyproject.toml's import-linter contract) and no module import loops back.

A lazy import inside a function counts as an import (a facade calls down, never up); imports under TYPE_CHECKING
do not. The contract's ``ignore_imports`` are the known exceptions, for both checks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
from importlinter.api import read_configuration

ROOT = Path(__file__).resolve().parents[1]
LAYERS = next(c for c in read_configuration(str(ROOT / "pyproject.toml"))["contracts_options"] if c["type"] == "layers")


def _graph() -> grimp.ImportGraph:
    graph = grimp.build_graph("mmsenti", exclude_type_checking_imports=True, cache_dir=None)
    for rule in LAYERS.get("ignore_imports", []):
        importer, imported = (m.strip() for m in rule.split("->"))
        graph.remove_import(importer=importer, imported=imported)
    return graph


def test_the_layers_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_top_level_module_has_a_layer():
    placed = {name.strip() for layer in LAYERS["layers"] for name in layer.replace("|", ":").split(":")}
    graph = grimp.build_graph("mmsenti", cache_dir=None)
    assert graph.find_children("mmsenti") - placed == set(), "give each new module or package a layer in pyproject.toml"


def test_no_import_cycle_between_modules():
    graph = _graph()
    loops = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                loops.append(" -> ".join((importer, *back)))
    assert not loops, "import cycles:\n" + "\n".join(loops)


def test_user_errors_keep_their_old_homes():
    from mmsenti import errors
    from mmsenti.backbones import weights
    from mmsenti.config import ConfigError
    from mmsenti.data.base import DataError
    from mmsenti.distributed import ProcessGroupError
    from mmsenti.export.format import ExportError, ParityError
    from mmsenti.models.files import ModelFileError
    from mmsenti.registry import RegistryError
    from mmsenti.train.cache import CacheError
    from mmsenti.train.checkpoint import CheckpointError
    from mmsenti.train.lock import RunDirLocked

    old = [ConfigError, DataError, ProcessGroupError, ExportError, ParityError, ModelFileError, RegistryError,
           CacheError, CheckpointError, RunDirLocked, weights.WeightsError, weights.MissingWeightsError]
    assert all(cls is getattr(errors, cls.__name__) and issubclass(cls, errors.UserError) for cls in old)
    assert issubclass(DataError, ValueError) and issubclass(ConfigError, ValueError) and issubclass(RegistryError, KeyError)
