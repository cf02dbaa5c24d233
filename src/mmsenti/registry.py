"""One registry per kind of thing (models, datasets, backbones, ...).

Command-line choices, docs tables and parametrised tests all read the registries, so a name exists in exactly
one place: the decorator next to the code it names.

As in timm, the packages that hold the registered code import all of their modules in their ``__init__``
(``mmsenti.models``, ``mmsenti.data``); a registry imports its package the first time it is read. A module that
fails to import fails that import every time it is retried, so a broken model module is an ImportError naming
it, never a registry that silently lacks its models.
"""

from __future__ import annotations

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


class Registry:
    """Named builders of one kind; ``package`` is imported (filling the registry) before the first read."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._entries: dict[str, Entry] = {}

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


MODELS = Registry("model", "mmsenti.models")
DATASETS = Registry("dataset", "mmsenti.data")
