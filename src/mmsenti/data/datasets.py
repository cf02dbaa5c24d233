"""Imports every module that registers datasets (the registry loads this lazily)."""

from mmsenti.data import formats, scenes  # noqa: F401
