"""Imports every module that registers datasets (the registry loads this lazily)."""

from mmsenti.data import scenes  # noqa: F401
