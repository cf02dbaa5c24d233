"""Building blocks shared by the fusion models: a pre-norm transformer block and attention pooling."""

from __future__ import annotations

import torch
from torch import nn


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP block that can return its attention weights (for explanations)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1, attn_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # No dropout on attention weights by default (as timm's ViTs): on CPU it forces the slow math attention.
        self.attn = nn.MultiheadAttention(dim, heads, dropout=attn_dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        # Residual dropout only (the MLP's 4x-wide hidden layer is not dropped: CPU dropout costs ~10 ns/element).
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``key_padding_mask``: (B, L), True where a token is padding. Weights: (B, heads, L, L) or None."""
        h = self.norm1(x)
        a, w = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=need_weights,
                         average_attn_weights=False)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, w


class AttentionPool(nn.Module):
    """Additive attention pooling: a_i = softmax_i(w^T tanh(W h_i + b)) over real tokens; returns Σ a_i h_i."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(torch.tanh(self.proj(x))).squeeze(-1)  # (B, L)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        return torch.einsum("bl,bld->bd", weights, x), weights
