"""One interface over the two kinds of CLIP mmsenti reads: Hugging Face ``CLIPModel`` and open_clip's ``CLIP``.

A model that uses a CLIP prior (INFIG's GAM) calls only :class:`ClipAdapter` (projected image and text
embeddings, the projection width) and the processor only :class:`ClipTokenizer` (texts → ids + mask, save/load).
The adapter holds a reference to the CLIP module and adds no state of its own, so the module stays where the
model registers it (state-dict keys ``clip.*``) and moves with the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

OPEN_CLIP_TOKENIZER_FILE = "open_clip_tokenizer.json"


class ClipAdapter:
    """Projected CLIP embeddings of a batch; see :func:`clip_adapter` for the implementation of a model."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def projection_dim(self) -> int:
        raise NotImplementedError

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P) projected image embeddings (not normalised)."""
        raise NotImplementedError

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, P) projected text embeddings (not normalised)."""
        raise NotImplementedError


class HFClip(ClipAdapter):
    """``transformers.CLIPModel``."""

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixel_values)
        return getattr(out, "pooler_output", out)  # transformers >= 5 returns an output object

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, "pooler_output", out)


class OpenClip(ClipAdapter):
    """open_clip's ``CLIP``. Its text tower pools at the end-of-text token and reads padding as id 0, so the
    attention mask is not needed."""

    @property
    def projection_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        return int(self.model.visual.output_dim)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def clip_adapter(model: nn.Module) -> ClipAdapter:
    """The adapter of a CLIP module (an HF ``CLIPModel`` or anything with open_clip's ``encode_image/encode_text``)."""
    if hasattr(model, "get_image_features"):
        return HFClip(model)
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        return OpenClip(model)
    raise TypeError(f"not a CLIP model: {type(model).__name__}")


# ------------------------------------------------------------------------------------------------ tokenizers
class ClipTokenizer:
    """Texts → ``{"input_ids", "attention_mask"}`` (long tensors) for a CLIP text tower; saved with the processor.

    Attribute access falls through to the wrapped tokenizer (the feature cache fingerprints it)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __getattr__(self, name: str) -> Any:
        if name in ("tokenizer", "max_length"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    @staticmethod
    def load(directory: str | Path, max_length: int) -> ClipTokenizer:
        directory = Path(directory)
        if (directory / OPEN_CLIP_TOKENIZER_FILE).is_file():
            meta = json.loads((directory / OPEN_CLIP_TOKENIZER_FILE).read_text())
            return OpenClipTokenizer.from_name(meta["model_id"], meta["context_length"])
        from transformers import AutoTokenizer

        return HFClipTokenizer(AutoTokenizer.from_pretrained(str(directory)), max_length)


class HFClipTokenizer(ClipTokenizer):
    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


class OpenClipTokenizer(ClipTokenizer):
    """open_clip's tokenizer: fixed-length ids (``context_length``), 0 = padding."""

    def __init__(self, tokenizer, max_length: int, model_id: str):
        super().__init__(tokenizer, max_length)
        self.model_id = model_id

    @classmethod
    def from_name(cls, model_id: str, context_length: int) -> OpenClipTokenizer:
        from mmsenti.compat import import_open_clip

        return cls(import_open_clip().get_tokenizer(model_id, context_length=context_length), context_length,
                   model_id)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts), context_length=self.max_length).long()
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def get_vocab(self) -> dict[str, int]:
        return dict(getattr(self.tokenizer, "encoder", {}))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / OPEN_CLIP_TOKENIZER_FILE).write_text(
            json.dumps({"model_id": self.model_id, "context_length": self.max_length}) + "\n")
