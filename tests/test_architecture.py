"""The layers of src/mmsenti hold (pyproject.toml's import-linter contract) and no module import loops back; outside
``models/``, no code names a concrete model.

A lazy import inside a function counts as an import (a facade calls down, never up); imports under TYPE_CHECKING
do not. The contract's ``ignore_imports`` are the known exceptions, for both checks.
"""

from __future__ import annotations

import ast
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


# ---------------------------------------------------------------------------------- models describe themselves
SRC = ROOT / "src" / "mmsenti"
# What runs models without knowing which: the services, the feature cache (train/cache.py), the command line.
MODEL_BLIND = ("explain", "export", "serve", "train", "batch_predict.py", "inference.py", "cli.py")


def _model_modules() -> dict[str, Path]:
    """The modules of the registered models (and of their own packages, e.g. models/infig/), by dotted name."""
    from mmsenti.registry import MODELS

    out = {}
    for entry in MODELS:
        module = sys.modules[entry.builder.__module__]
        path = Path(module.__file__).resolve()
        if SRC / "models" not in path.parents:
            continue  # a plugin's, outside the package
        own = path.parent if path.parent != SRC / "models" else None  # a model package: every module in it
        for p in own.rglob("*.py") if own is not None else [path]:
            dotted = ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
            out[dotted.removesuffix(".__init__")] = p
    return out


def _references(tree: ast.AST, names: set[str], classes: set[str], modules: set[str]) -> list[tuple[int, str]]:
    def model_module(m: str | None) -> bool:
        return m is not None and any(m == x or m.startswith(x + ".") for x in modules)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if model_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if model_module(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
            found += [(node.lineno, f"import of {a.name}") for a in node.names
                      if a.name in classes or model_module(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Name) and node.id in classes:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute) and node.attr in classes:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value in names or model_module(node.value)):
            found.append((node.lineno, repr(node.value)))
    return found


def test_outside_models_no_code_names_a_concrete_model():
    """The services ask a model what it needs (its config's inputs, card and batch dependence; its explanation,
    export and compile hooks), never which model it is: no registered model's name, no class of a model's own
    modules, no import of them."""
    from mmsenti.registry import MODELS

    modules = _model_modules()
    classes = {n.name for p in modules.values() for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)}
    assert {"Infig", "Rahp", "CrossBlock", "LateFusion"} <= classes and "MultimodalModel" not in classes
    names = set(MODELS.names())
    files = [p for part in MODEL_BLIND for p in ((SRC / part).rglob("*.py") if (SRC / part).is_dir() else [SRC / part])]
    bad = [f"{p.relative_to(SRC.parent)}:{line}: {what}" for p in files
           for line, what in _references(ast.parse(p.read_text()), names, classes, set(modules))]
    assert not bad, "code that names a concrete model:\n" + "\n".join(bad)


def test_the_check_sees_a_concrete_model_when_one_is_named():
    modules = _model_modules()
    code = ("from mmsenti.models.rahp import CrossBlock\nimport mmsenti.models.infig.alignment\n"
            "if cfg.name == 'rahp' or isinstance(m, Infig):\n    pass\n")
    found = _references(ast.parse(code), {"rahp"}, {"CrossBlock", "Infig"}, set(modules))
    assert [line for line, _ in found] == [1, 1, 2, 3, 3]
