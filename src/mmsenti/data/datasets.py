"""Imports every module that registers datasets (the registry loads this lazily)."""

from mmsenti.data import formats, scenes, synthetic_mmsa  # noqa: F401
