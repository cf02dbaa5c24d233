"""The description of an exported graph's tensors and the export's errors (no torch: onnxruntime alone reads them).

The export folder's files are named with the saved-model format: :mod:`mmsenti.models.folder`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mmsenti.errors import ExportError, ParityError  # noqa: F401 - their home was this module

DEFAULT_OPSET = 20  # torch.onnx's default for the dynamo exporter
PRESENT_KEYS = ("image_present", "text_present")  # which modalities a post has (models that can hide one)


@dataclass
class TensorSpec:
    """One graph input or output: name, element type (numpy name) and shape (a string = a dynamic axis)."""

    name: str
    dtype: str
    shape: list[int | str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.name} {self.dtype}[{', '.join(map(str, self.shape))}]"
