"""What a model's explanation hook (:meth:`~mmsenti.models.base.MultimodalModel.explain_forward`) hands the explain
package: its forward outputs for one post, plus what an explanation of this model adds to every model's (modality
attribution and Integrated Gradients). The explain package turns these into results and figures; it never asks
which model it explains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class WordRegions:
    """What word → region maps are drawn from: a fusion transformer over ``[image [CLS], regions ; text [CLS],
    pieces, [SEP], padding]`` (regions row-major over ``grid``), for one post.

    Attributes:
        grid: (rows, cols) of the regions; None when the image tokens are a post's tags (a set, one token per slot
            of the ``tags`` input, padding slots included: the explanation keeps the post's real tags).
        num_image_tokens: image [CLS] + regions (or tag slots).
        attentions: every fusion layer's attention, lowest first, each (heads, L, L).
        pool_weights: the attention-pooling weight of each fusion token, (L,).
        similarity: cos(text token, region) of one aligned layer, (text tokens without [CLS], regions), or None.
        similarity_title: what ``similarity`` is (the figure's title).
        notes: said with the maps (e.g. why there is no similarity map).
    """

    grid: tuple[int, int] | None
    num_image_tokens: int
    attentions: list[torch.Tensor]
    pool_weights: torch.Tensor
    similarity: torch.Tensor | None = None
    similarity_title: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Retrieved:
    """The training samples a retrieval-augmented forward pass put into its contexts.

    Attributes:
        found: ``{target modality: {searched index: Neighbours}}`` as the model retrieved them (batch of one).
        ids: the sample id of each memory-bank row (None: rows are positions in the batch).
    """

    found: dict[str, dict[str, Any]]
    ids: list[str] | None = None


@dataclass
class Explained:
    """An explained forward pass: ``outputs`` (with ``logits``), and what this model adds to its explanation."""

    outputs: dict[str, Any]
    word_regions: WordRegions | None = None
    neighbours: Retrieved | None = None
    notes: list[str] = field(default_factory=list)  # said at the end of the explanation
