"""Readers for the benchmark datasets and for a user's own files.

Importing this package runs every module's ``@DATASETS.register`` decorator. Each loader returns a
:class:`~mmsenti.data.base.DatasetBundle` whose splits are keyed ``train``/``dev``/``test`` and whose
``modalities`` say what the copy on disk holds. ``docs/datasets.md`` describes the layouts and rules.
"""

from mmsenti.data.formats import hfm, memes, mmsa, mvsa, tumemo, user  # noqa: F401
from mmsenti.data.formats.common import lenient
from mmsenti.data.formats.images import apply_image_policy, blank_image, inspect_image
from mmsenti.data.formats.text import normalize_tweet

__all__ = ["apply_image_policy", "blank_image", "inspect_image", "lenient", "normalize_tweet"]
