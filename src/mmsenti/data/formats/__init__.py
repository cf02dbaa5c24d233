"""Readers for the benchmark datasets and for a user's own files.

Importing this package runs every module's ``@DATASETS.register`` decorator. Each loader, ``build(cfg, *,
lenient=False)``, returns a :class:`~mmsenti.data.base.DatasetBundle` whose splits are keyed ``train``/``dev``/
``test`` and whose ``modalities`` say what the copy on disk holds; ``lenient=True`` keeps what the final checks
would refuse (duplicate ids, missing images, suspect labels) for the data doctor to report
(:mod:`~mmsenti.data.formats.bundle`). ``docs/datasets.md`` describes the layouts and rules.
"""

from mmsenti.data.formats import features, hfm, memes, mmsa, mvsa, tumemo, user  # noqa: F401
from mmsenti.data.formats.images import apply_image_policy, blank_image, inspect_image
from mmsenti.data.formats.text import normalize_tweet

__all__ = ["apply_image_policy", "blank_image", "inspect_image", "normalize_tweet"]
