"""Imports every module that registers models (the registry loads this lazily)."""

from mmsenti.models import baselines, rahp  # noqa: F401
from mmsenti.models.infig import model as infig_model  # noqa: F401
