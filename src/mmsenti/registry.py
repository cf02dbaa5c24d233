"""One registry per kind of thing (models, datasets, backbones, ...).

Command-line choices, docs tables and parametrised tests all read the registries, so a name exists in exactly
one place: the decorator next to the code it names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """A registered builder with its typed config class and a one-line description."""

    name: str
    builder: Callable[..., Any]
    config_cls: type | None
    description: str


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, config: type | None = None, description: str = "") -> Callable:
        """Decorator: ``@MODELS.register("late-fusion", config=LateFusionConfig)``."""

        def wrap(fn: Callable) -> Callable:
            if name in self._entries:
                raise RegistryError(f"{self.kind} '{name}' is already registered")
            doc = description or next(iter((fn.__doc__ or "").strip().splitlines()), "")
            self._entries[name] = Entry(name, fn, config, doc)
            return fn

        return wrap

    def get(self, name: str) -> Entry:
        _ensure_builtins_loaded()
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} '{name}' (known: {', '.join(self.names())})")
        return self._entries[name]

    def names(self) -> list[str]:
        _ensure_builtins_loaded()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _ensure_builtins_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        _ensure_builtins_loaded()
        return iter(self._entries[n] for n in sorted(self._entries))

    def __len__(self) -> int:
        _ensure_builtins_loaded()
        return len(self._entries)


MODELS = Registry("model")
DATASETS = Registry("dataset")

_loaded = False


def _ensure_builtins_loaded() -> None:
    """Import the modules whose decorators fill the registries (once, lazily, to keep `import mmsenti` light)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import mmsenti.data.datasets  # noqa: F401
    import mmsenti.models.zoo  # noqa: F401
