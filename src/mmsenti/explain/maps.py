"""INFIG's word → region maps and importance, as pure functions of the model's outputs (numpy, one sample).

The fusion sequence is ``[image [CLS], regions (row-major over the grid) ; text [CLS], pieces, [SEP], padding]``;
HFAM's token states have no [CLS] on either side. Word maps average a word's pieces (each piece's map is a
distribution or a cosine profile over the regions); importances add them up. When the image is a post's tags there
is no grid (``grid`` None): the image tokens are tag slots, and the maps stay flat, one value per slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmsenti.explain.results import Word
from mmsenti.explain.text import pool_words


def head_mean(attention: np.ndarray) -> np.ndarray:
    """(heads, L, L) → (L, L): the attention averaged over heads (rows still sum to 1)."""
    if attention.ndim != 3:
        raise ValueError(f"expected (heads, L, L) attention, got shape {attention.shape}")
    return attention.mean(0)


def attention_rollout(attentions: Sequence[np.ndarray], residual: float = 0.5) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) over layers given lowest first, each (heads, L, L).

    Each layer's head-averaged attention gets the residual connection as identity, ``r·I + (1 − r)·A``, rows
    renormalised; the product ``Â_N ··· Â_1`` says how much each output token draws on each input token through
    all layers. Returns (L, L), rows summing to 1.
    """
    if not attentions:
        raise ValueError("attention rollout needs at least one layer")
    out = None
    for a in attentions:
        a = head_mean(np.asarray(a, dtype=np.float64))
        a = residual * np.eye(a.shape[0]) + (1.0 - residual) * a
        a = a / a.sum(-1, keepdims=True)
        out = a if out is None else a @ out
    return out


def _on_grid(values: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
    """(..., N) per image token → (..., rows, cols) over the region grid; unchanged without a grid (tags)."""
    if grid is None:
        return values
    rows, cols = grid
    if values.shape[-1] != rows * cols:
        raise ValueError(f"{values.shape[-1]} visual tokens do not fit a {rows}x{cols} grid")
    return values.reshape(*values.shape[:-1], rows, cols)


def word_region_attention(attention: np.ndarray, words: Sequence[Word], num_image_tokens: int,
                          grid: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """From an (L, L) attention (one layer, or rollout), each word's attention on the image regions.

    Args:
        attention: rows = queries, columns = keys, in fusion-sequence order.
        words: their ``tokens`` are positions in the text input ids; in the fusion sequence text position t sits at
            ``num_image_tokens + t``.
        num_image_tokens: image [CLS] + regions (or tag slots).
        grid: (rows, cols) of the regions; None for tags.

    Returns:
        maps (n_words, rows, cols) (tags: (n_words, slots)), and each word's total attention on the image tokens
        (n_words,).
    """
    to_regions = attention[num_image_tokens:, 1:num_image_tokens]  # text queries → region keys
    maps = pool_words(to_regions, words, "mean")
    return _on_grid(maps, grid), maps.sum(-1)


def word_region_similarity(similarity: np.ndarray, words: Sequence[Word], grid: tuple[int, int] | None) -> np.ndarray:
    """From HFAM's (N_t, N_i) token-wise cosine (text tokens without [CLS], so text position t is row t − 1), each
    word's cosine with every region: (n_words, rows, cols) (tags: (n_words, slots))."""
    return _on_grid(pool_words(similarity, words, "mean", offset=1), grid)


def pooling_importance(pool_weights: np.ndarray, words: Sequence[Word], num_image_tokens: int,
                       grid: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, float]:
    """INFIG's attention-pooling weights a_i (eqs. 8-9) over the fusion sequence → per word (sum of its pieces),
    per region (rows, cols) (tags: per slot), and the image [CLS]'s weight."""
    text = pool_weights[num_image_tokens:]
    return (pool_words(text, words, "sum"), _on_grid(pool_weights[1:num_image_tokens], grid),
            float(pool_weights[0]))


def region_boxes(grid: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Where each region of the grid lies in the original image: (rows, cols, 4) of (left, top, right, bottom).

    ``box`` is the part of the image the model sees (:meth:`ImageTransform.source_box`); the model's square input
    is cut into equal cells, so with ``squash`` a cell covers a rectangle of a non-square image, and with a centre
    crop the cells cover only the crop.
    """
    rows, cols = grid
    left, top, right, bottom = box
    xs = np.linspace(left, right, cols + 1)
    ys = np.linspace(top, bottom, rows + 1)
    out = np.empty((rows, cols, 4))
    for r in range(rows):
        for c in range(cols):
            out[r, c] = (xs[c], ys[r], xs[c + 1], ys[r + 1])
    return out
