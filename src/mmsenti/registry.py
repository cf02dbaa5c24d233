"""One registry per kind of thing (models, datasets, backbones, ...).

Command-line choices, docs tables and parametrised tests all read the registries, so a name exists in exactly
one place: the decorator next to the code it names.

As in timm, the packages that hold the registered code import all of their modules in their ``__init__``
(``mmsenti.models``, ``mmsenti.data``); a registry imports its package the first time it is read. A module that
fails to import fails that import every time it is retried, so a broken model module is an ImportError naming
it, never a registry that silently lacks its models.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mmsenti.errors import RegistryError


@dataclass(frozen=True)
class Entry:
    """A registered builder with its typed config class and a one-line description."""

    name: str
    builder: Callable[..., Any]
    config_cls: type | None
    description: str


@dataclass(frozen=True)
class Variant:
    """A registered entry under another name with other defaults for some of its settings, as timm's
    ``test_resnet`` is ResNet with small widths: ``infig-tiny`` is ``infig`` built from ``overrides`` (a nested
    mapping of its config section, e.g. ``{"width": 32, "text_encoder": {"num_layers": 1}}``). A config naming a
    variant resolves to the base entry's name with these settings under its own, so a saved config names the
    base and holds every resolved setting."""

    name: str
    base: str
    overrides: dict[str, Any]
    description: str


class Registry:
    """Named builders of one kind; ``package`` is imported (filling the registry) before the first read."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._entries: dict[str, Entry] = {}
        self._variants: dict[str, Variant] = {}

    def _load(self) -> None:
        # A no-op lookup in sys.modules once the package is imported (or while it is being imported); after a
        # failed import the package is not in sys.modules, so the import runs, and raises, again.
        if self.package is not None:
            importlib.import_module(self.package)

    def register(self, name: str, *, config: type | None = None, description: str = "") -> Callable:
        """Decorator: ``@MODELS.register("late-fusion", config=LateFusionConfig)``."""

        def wrap(fn: Callable) -> Callable:
            old = self._entries.get(name)
            # The same function registering again is its module re-running after a failed package import.
            same = old is not None and (old.builder.__module__, old.builder.__qualname__) == (
                fn.__module__, fn.__qualname__)
            if old is not None and not same:
                raise RegistryError(f"{self.kind} '{name}' is already registered")
            doc = description or next(iter((fn.__doc__ or "").strip().splitlines()), "")
            self._entries[name] = Entry(name, fn, config, doc)
            return fn

        return wrap

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} '{name}' (known: {', '.join(self.names())})")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._load()
        return iter(self._entries[n] for n in sorted(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    # ------------------------------------------------------------------------------------------------ variants
    def register_variant(self, name: str, base: str, overrides: dict[str, Any], *, description: str = "") -> None:
        """Register ``name`` as entry ``base`` with other defaults: ``overrides`` (nested, as the config section
        holds them). Declared at the end of the base's module, after its ``register``."""
        if base not in self._entries:
            raise RegistryError(f"{self.kind} variant '{name}': register '{base}' before its variants")
        variant = Variant(name, base, copy.deepcopy(overrides), description or f"{base} with other defaults")
        # Registering again the same variant is its module re-running after a failed package import.
        if name in self._entries or self._variants.get(name, variant) != variant:
            raise RegistryError(f"{self.kind} '{name}' is already registered")
        self._variants[name] = variant

    def variants(self, base: str | None = None) -> list[Variant]:
        """The registered variants (of ``base`` only, when given), sorted by name."""
        self._load()
        return [v for n, v in sorted(self._variants.items()) if base is None or v.base == base]

    def resolve(self, name: str) -> tuple[Entry, dict[str, Any]]:
        """The entry that ``name`` (an entry or a variant) builds, and the settings the variant changes (a copy;
        empty for an entry)."""
        self._load()
        if name in self._variants:
            variant = self._variants[name]
            return self._entries[variant.base], copy.deepcopy(variant.overrides)
        if name not in self._entries:
            known = ", ".join(sorted([*self._entries, *self._variants]))
            raise RegistryError(f"unknown {self.kind} '{name}' (known: {known})")
        return self._entries[name], {}


MODELS = Registry("model", "mmsenti.models")
DATASETS = Registry("dataset", "mmsenti.data")
