"""Extraction settings and the extractors they build: what turns a clip into the feature sequences a model reads.

The settings (:class:`ExtractionConfig`) are written into an extraction's ``manifest.json`` and into the config of
every model trained on its features (``model.extraction``), so a model extracts a new clip exactly as its training
clips were, and features made otherwise are refused with the first setting that differs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsenti.config import ConfigError, dict_differences, from_dict
from mmsenti.data.video.extractors import ClipLimits, Extractor
from mmsenti.errors import DataError
from mmsenti.registry import EXTRACTORS

MODALITIES = ("audio", "vision")
DEFAULT_EXTRACTORS = {"audio": "opensmile", "vision": "face"}  # a modality's settings without a name use these


@dataclass
class ExtractionConfig:
    """Which extractor reads each stream of a clip (``{"name": <registered extractor>, ...its settings}``; null: the
    stream is not read), and the clip limits every extractor applies."""

    audio: dict[str, Any] | None = field(default_factory=lambda: {"name": "opensmile"})
    vision: dict[str, Any] | None = field(default_factory=lambda: {"name": "face"})
    max_seconds: float = 600.0  # longer clips are refused (their decoding stops there)
    min_seconds: float = 0.5  # shorter ones too: no extractor has a window's worth of them

    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self, m) is not None]

    def settings(self, modality: str) -> tuple[str, Any]:
        """``(extractor name, its typed settings)`` for ``modality``."""
        spec = dict(getattr(self, modality) or {})
        name = spec.pop("name", DEFAULT_EXTRACTORS[modality])
        if not isinstance(name, str):
            raise ConfigError(f"{modality}.name: name an extractor (known: {', '.join(EXTRACTORS.names())})")
        entry = EXTRACTORS.get(name)
        if entry.builder.modality != modality:
            raise ConfigError(f"{modality}.name: '{name}' extracts {entry.builder.modality}, not {modality}")
        try:
            return name, from_dict(entry.config_cls, spec, modality)
        except DataError as e:  # the settings' own range checks
            raise ConfigError(str(e)) from None

    def resolved(self) -> dict[str, Any]:
        """Every setting, defaults filled in: what a model records and two extractions are compared by."""
        out: dict[str, Any] = {"max_seconds": self.max_seconds, "min_seconds": self.min_seconds}
        for m in MODALITIES:
            if getattr(self, m) is None:
                out[m] = None
            else:
                name, settings = self.settings(m)
                out[m] = {"name": name, **dataclasses.asdict(settings)}
        return out

    @classmethod
    def from_mapping(cls, data: dict[str, Any], prefix: str = "") -> ExtractionConfig:
        cfg = from_dict(cls, data, prefix)
        if not cfg.modalities():
            raise ConfigError(f"{prefix or 'extraction'}: read audio, vision or both (both are null)")
        if not 0 < cfg.min_seconds < cfg.max_seconds:
            raise ConfigError(f"{prefix or 'extraction'}: need 0 < min_seconds < max_seconds")
        cfg.resolved()  # every extractor's settings are checked now, not at the first clip
        return cfg


def difference(ours: dict[str, Any], theirs: dict[str, Any], *, mine: str = "this model",
               other: str = "the features") -> str | None:
    """The first setting in which two resolved extractions differ, as one line; None when they agree."""
    diffs = dict_differences(ours, theirs)
    if not diffs:
        return None
    key, (a, b) = next(iter(diffs.items()))
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    return f"extraction setting {key}: {a!r} for {mine}, {b!r} for {other}{more}"


class Extraction:
    """The extractors of one :class:`ExtractionConfig`, built once (models, cascades) and run clip after clip."""

    def __init__(self, config: ExtractionConfig | dict[str, Any]):
        if isinstance(config, dict):
            config = ExtractionConfig.from_mapping(config)
        self.config = config
        limits = ClipLimits(config.max_seconds, config.min_seconds)
        self.extractors: dict[str, Extractor] = {}
        for m in config.modalities():
            name, settings = config.settings(m)
            self.extractors[m] = EXTRACTORS.get(name).builder(settings, limits)

    @property
    def dims(self) -> dict[str, int]:
        return {m: e.dim for m, e in self.extractors.items()}

    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for e in self.extractors.values():
            out.update(e.versions())
        return out

    def __call__(self, path: str | Path) -> tuple[dict[str, np.ndarray], list[str]]:
        """``({modality: (T, D) float32}, notes)`` for one clip.

        Raises:
            DataError: the clip cannot be used (unreadable, a stream missing, too long or too short), naming it.
        """
        path = Path(path)
        out, notes = {}, []
        for m, extractor in self.extractors.items():
            out[m] = extractor(path)
            notes += [f"{m}: {n}" for n in extractor.notes]
        return out, notes


_extractions: dict[str, Extraction] = {}


def cached_extraction(resolved: dict[str, Any]) -> Extraction:
    """The process's :class:`Extraction` for these settings (a served model builds its extractors once)."""
    import json

    key = json.dumps(resolved, sort_keys=True)
    if key not in _extractions:
        _extractions[key] = Extraction(ExtractionConfig.from_mapping(resolved))
    return _extractions[key]
