"""Every registered dataset. Importing this package imports each dataset module, whose ``@DATASETS.register``
decorators fill :data:`mmsenti.registry.DATASETS`: a module that fails to import makes ``import mmsenti.data``
fail with its error.
"""

from mmsenti.data import formats, scenes, synthetic_mmsa  # noqa: F401
