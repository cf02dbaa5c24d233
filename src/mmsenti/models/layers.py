"""Building blocks shared by the fusion models: multi-head attention, a pre-norm transformer block, attention
pooling."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionImpl = Literal["sdpa", "mha"]


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention on ``F.scaled_dot_product_attention``.

    It has ``torch.nn.MultiheadAttention``'s parameters under the same names (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``) and draws them from the RNG in the same order, so state dicts load into either and a seed gives
    the same initial weights. SDPA picks a fused kernel (flash attention on CPU) and skips
    ``nn.MultiheadAttention``'s input checks and float-mask construction. With ``need_weights=True`` it computes
    the attention explicitly (softmax of the scaled scores, padding masked) and returns the per-head weights
    (B, heads, L_q, L_k), as explanations read them.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention._reset_parameters
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``key_padding_mask``: (B, L_k), True where a key is padding. Returns (output, weights or None)."""
        w, bias, d = self.in_proj_weight, self.in_proj_bias, self.dim
        if query is key and key is value:  # self-attention: one projection for q, k and v
            q, k, v = F.linear(query, w, bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, w[:d], bias[:d])
            if key is value:
                k, v = F.linear(key, w[d:], bias[d:]).chunk(2, dim=-1)
            else:
                k, v = F.linear(key, w[d:2 * d], bias[d:2 * d]), F.linear(value, w[2 * d:], bias[2 * d:])
        q, k, v = self._split(q), self._split(k), self._split(v)
        keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], d)
        return self.out_proj(out), weights


def build_attention(dim: int, heads: int, dropout: float = 0.0, impl: AttentionImpl = "sdpa") -> nn.Module:
    """``"sdpa"``: :class:`MultiheadAttention`; ``"mha"``: ``torch.nn.MultiheadAttention`` (the earlier path).

    Both have the same parameter names and take ``(query, key, value, key_padding_mask=, need_weights=)``.
    """
    if impl == "sdpa":
        return MultiheadAttention(dim, heads, dropout)
    if impl == "mha":
        return _TorchMHA(dim, heads, dropout=dropout, batch_first=True)
    raise ValueError(f"unknown attention implementation {impl!r} (known: sdpa, mha)")


class _TorchMHA(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` returning per-head weights (not averaged), as :class:`MultiheadAttention` does."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False):  # type: ignore[override]
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               average_attn_weights=False)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP block that can return its attention weights (for explanations)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1, attn_dropout: float = 0.0,
                 attention: AttentionImpl = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # No dropout on attention weights by default (as timm's ViTs): on CPU it forces the slow math attention.
        self.attn = build_attention(dim, heads, attn_dropout, attention)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        # Residual dropout only (the MLP's 4x-wide hidden layer is not dropped: CPU dropout costs ~10 ns/element).
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``key_padding_mask``: (B, L), True where a token is padding. Weights: (B, heads, L, L) or None."""
        h = self.norm1(x)
        a, w = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=need_weights)
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
