"""One registry per kind of thing (models, datasets, backbones, ...).

Command-line choices, docs tables and parametrised tests all read the registries, so a name exists in exactly
one place: the decorator next to the code it names.

As in timm, the packages that hold the registered code import all of their modules in their ``__init__``
(``mmsenti.models``, ``mmsenti.data``); a registry imports its package the first time it is read. A module that
fails to import fails that import every time it is retried, so a broken model module is an ImportError naming
it, never a registry that silently lacks its models.

Other packages add models (and the input builders they read) through the entry-point group ``mmsenti.models``:
each entry point names a module (or an object in it) whose import registers them with ``@MODELS.register``. The
group is read the first time the registry is. A plugin that fails to import is reported in one line naming the
entry point and the error (a warning, and the answer to a lookup of a name it would have registered); the built-in
models and the other plugins stay available.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mmsenti.errors import RegistryError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mmsenti.models"  # third-party models and their input builders


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

    def __init__(self, kind: str, package: str | None = None, entry_points: str | None = None):
        self.kind = kind
        self.package = package
        self.entry_points = entry_points  # the entry-point group of plugins (see load_plugins)
        self._entries: dict[str, Entry] = {}
        self._variants: dict[str, Variant] = {}

    def _load(self) -> None:
        # A no-op lookup in sys.modules once the package is imported (or while it is being imported); after a
        # failed import the package is not in sys.modules, so the import runs, and raises, again.
        if self.package is not None:
            importlib.import_module(self.package)
        if self.entry_points is not None:
            load_plugins(self.entry_points)  # once per process

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
            raise RegistryError(f"unknown {self.kind} '{name}' (known: {', '.join(self.names())})"
                                + self._broken_note())
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
            raise RegistryError(f"unknown {self.kind} '{name}' (known: {known})" + self._broken_note())
        return self._entries[name], {}

    # ------------------------------------------------------------------------------------------------ plugins
    def _broken_note(self) -> str:
        return "".join(f"; {line}" for line in BROKEN_PLUGINS.get(self.entry_points or "", {}).values())

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plugin that is unloaded, e.g. after a test that registered it)."""
        self._entries.pop(name, None)


# entry-point group → {entry-point name: the one line saying why it did not load}
BROKEN_PLUGINS: dict[str, dict[str, str]] = {}
_READ_GROUPS: set[str] = set()


def load_plugins(group: str, again: bool = False) -> list[str]:
    """Import every entry point of ``group`` (once per process, or ``again``: after installing a plugin, or in a
    test); returns the names of those that loaded. One that fails is not raised: it is logged in one line naming it
    and its error, kept in :data:`BROKEN_PLUGINS` and named when a lookup in a registry of that group fails."""
    from importlib.metadata import entry_points

    if group in _READ_GROUPS and not again:
        return []
    _READ_GROUPS.add(group)  # first: a plugin that reads a registry while it imports must not recurse
    broken = BROKEN_PLUGINS.setdefault(group, {})
    loaded = []
    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - any failure of a third-party import is reported, not raised
            first = next(iter(str(e).strip().splitlines()), "")
            broken[ep.name] = f"plugin '{ep.name}' ({ep.value}) of {group} failed to load: {type(e).__name__}: {first}"
            log.warning("%s", broken[ep.name])
        else:
            broken.pop(ep.name, None)
            loaded.append(ep.name)
    return loaded


MODELS = Registry("model", "mmsenti.models", entry_points=ENTRY_POINT_GROUP)
DATASETS = Registry("dataset", "mmsenti.data")
# Input builders: the built-in kinds (mmsenti.data.inputs), and those model plugins bring with them.
INPUTS = Registry("input", "mmsenti.data.inputs", entry_points=ENTRY_POINT_GROUP)
# Feature extractors of raw clips (audio, vision): `mmsenti features extract` and models trained on what they made.
EXTRACTORS = Registry("extractor", "mmsenti.data.video.extractors", entry_points=ENTRY_POINT_GROUP)
