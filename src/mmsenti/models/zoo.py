"""Imports every module that registers models (the registry loads this lazily)."""

from mmsenti.models import baselines  # noqa: F401
