"""The former name of :mod:`mmsenti.models.folder` (the saved-model format), kept so that imports of it still work."""

from mmsenti.models.folder import (  # noqa: F401
    MANIFEST,
    WEIGHTS,
    ModelFileError,
    read_config,
    read_json,
    read_labels,
    verify_manifest,
    write_manifest,
)
