"""INFIG's alignment objectives: the Global Alignment Module (GAM) and the Hierarchical Fine-Grained Alignment
Module (HFAM), plus the momentum-encoder and feature-queue machinery the GAM needs.

Everything here is pure torch and vectorised over the batch; the INFIG model owns the encoders and calls these.

* GAM (eqs. 1-2): online global features are contrasted with ``[momentum features of the batch ; queue]`` as in
  ALBEF / MoCo, InfoNCE image→text and text→image, learnable temperature.
* HFAM (eqs. 3-6): FILIP-style token-wise similarity. For an image ``p`` with visual tokens ``v_1..v_{n_i}`` and a
  text ``q`` with real (non-padding) tokens ``w_1..w_{n_t}``::

      S_p2q = 1/(j·n_i) · Σ_k  Σ top-j_l cos(v_k, w_l)      (top-j over the text's real tokens only)
      S_q2p = 1/(j·n_t) · Σ_l  Σ top-j_k cos(v_k, w_l)      (sum over the text's real tokens only)

  then InfoNCE over the batch in both directions, averaged over the last M layers.

Multi-process training: both losses take a ``gather`` hook, the one contract of :data:`mmsenti.distributed.GatherFn`:
``gather(x) -> (x_all, offset)``, every process's rows in rank order with this process's at ``offset``, gradients
flowing back to the process that owns a row. ``None`` means a single process. The trainer sets it (see
:func:`mmsenti.distributed.attach_gather`):

* GAM gathers the momentum keys of the whole global batch (no gradient: they are detached) and their sample ids;
  every process enqueues the same gathered keys, so the queues stay identical on every process and equal to a
  single process's; the positives of local anchor ``i`` are at ``offset + i``.
* HFAM contrasts local images with the texts of the global batch and local texts with its images, through the
  differentiable gather (token states and masks are zero-padded to a common text length), so the gradient of a
  process's loss reaches the encoders of every process.

Each process's loss is then the mean over its own anchors, and DDP's gradient average over processes equals the
single-process loss of the global batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmsenti.distributed import GatherFn

__all__ = [
    "FeatureQueue",
    "FineGrainedAlignmentLoss",
    "GatherFn",
    "GlobalAlignmentLoss",
    "LearnableTemperature",
    "fine_grained_similarity",
    "make_momentum_copy",
    "momentum_update",
    "token_similarity",
]


# ----------------------------------------------------------------------------------------------------------------
# Temperature
# ----------------------------------------------------------------------------------------------------------------


class LearnableTemperature(nn.Module):
    """Softmax temperature τ (logits are ``similarity / τ``), stored raw as in ALBEF and kept in ``[min, max]``.

    Calling the module projects τ back into range (it may have left it after an optimizer step) and returns it as a
    0-d tensor that carries the gradient. One instance can be shared by several losses.

    Args:
        init: initial value (paper and ALBEF: 0.07).
        min: lower bound (ALBEF: 0.001).
        max: upper bound (ALBEF: 0.5).
        learnable: a trainable parameter, or a fixed buffer.
    """

    def __init__(self, init: float = 0.07, min: float = 0.001, max: float = 0.5, learnable: bool = True):
        super().__init__()
        if not 0.0 < min <= init <= max:
            raise ValueError(f"temperature needs 0 < min <= init <= max, got min={min}, init={init}, max={max}")
        self.min, self.max = float(min), float(max)
        value = torch.tensor(float(init))
        if learnable:
            self.value = nn.Parameter(value)
        else:
            self.register_buffer("value", value)

    def forward(self) -> Tensor:
        # Projected gradient descent (ALBEF clamps in place each step; an out-of-place clamp would zero the
        # gradient once τ is outside the range and leave it stuck there). Through ``.data`` so that a second call
        # in the same step (τ shared by GAM and HFAM) does not bump the autograd version of a tensor that the first
        # call's graph saved; the value only ever changes on the first call after an optimizer step.
        self.value.data.clamp_(self.min, self.max)
        return self.value

    def extra_repr(self) -> str:
        return f"value={float(self.value.detach()):.4g}, min={self.min:g}, max={self.max:g}, learnable={self.value.requires_grad}"


def _as_temperature(temperature: Tensor | float) -> Tensor | float:
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        return temperature.reshape(())
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return float(temperature)


# ----------------------------------------------------------------------------------------------------------------
# Hierarchical fine-grained alignment (HFAM)
# ----------------------------------------------------------------------------------------------------------------


def _check_tokens(img_tokens: Tensor, txt_tokens: Tensor, txt_mask: Tensor, top_j: int) -> None:
    if img_tokens.ndim != 3 or txt_tokens.ndim != 3:
        raise ValueError(f"expected (B, N, D) token tensors, got {tuple(img_tokens.shape)} and {tuple(txt_tokens.shape)}")
    if img_tokens.shape[-1] != txt_tokens.shape[-1]:
        raise ValueError(f"image and text token widths differ: {img_tokens.shape[-1]} vs {txt_tokens.shape[-1]} "
                         "(project them to a common width first)")
    if txt_mask.shape != txt_tokens.shape[:2]:
        raise ValueError(f"txt_mask shape {tuple(txt_mask.shape)} != text tokens' {tuple(txt_tokens.shape[:2])}")
    if img_tokens.shape[1] == 0 or txt_tokens.shape[1] == 0:
        raise ValueError("token sequences must not be empty")
    if top_j < 1:
        raise ValueError(f"top_j must be >= 1, got {top_j}")


def _fine_grained_block(img: Tensor, txt: Tensor, mask: Tensor, top_j: int, p2q: bool, q2p: bool,
                        img_mask: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """S_p2q / S_q2p for one block of already normalised images × texts; see :func:`fine_grained_similarity`."""
    bi, ni, d = img.shape
    bt, nt, _ = txt.shape
    # One GEMM for all pairs: (bi·ni, d) @ (d, bt·nt), laid out as (image, visual token, text, text token).
    sim = (img.reshape(bi * ni, d) @ txt.reshape(bt * nt, d).T).view(bi, ni, bt, nt)
    # Padding at -inf is never among a visual token's top-k while a real token is left. In place: the GEMM's
    # backward does not need its output, and topk saves only indices, so no copy of the big tensor is needed.
    sim.masked_fill_(~mask, float("-inf"))
    if img_mask is not None:  # tags: padding rows too
        sim.masked_fill_(~img_mask[:, :, None, None], float("-inf"))
        n_i = img_mask.sum(-1)  # real visual tokens per image, (bi,)
    else:
        n_i = torch.full((bi,), ni, device=sim.device)
    n_t = mask.sum(-1)  # real tokens per text, (bt,)
    s_p2q = s_q2p = None
    if p2q:
        k = min(top_j, nt)
        top = sim.topk(k, dim=-1).values  # (bi, ni, bt, k)
        # A text with fewer than k real tokens has padding at ranks >= n_t: dropped here.
        j_eff = n_t.clamp(max=top_j)  # (bt,)
        keep = torch.arange(k, device=sim.device) < j_eff[:, None]  # (bt, k)
        if img_mask is not None:
            keep = keep & img_mask[:, :, None, None]  # (bi, ni, bt, k)
        total = torch.where(keep, top, 0.0).sum(dim=(1, 3))  # (bi, bt)
        s_p2q = total / (j_eff.clamp(min=1) * n_i[:, None].clamp(min=1))
    if q2p:
        k = min(top_j, ni)
        top = sim.topk(k, dim=1).values  # (bi, k, bt, nt): per text token, its top-k over visual tokens
        k_eff = n_i.clamp(max=top_j)  # (bi,): an image with fewer real visual tokens sums fewer
        keep = torch.arange(k, device=sim.device) < k_eff[:, None]  # (bi, k)
        top = torch.where(keep[:, :, None, None], top, 0.0).sum(dim=1)  # (bi, bt, nt)
        total = torch.where(mask, top, 0.0).sum(dim=-1)  # padding columns (all -inf) are not counted
        s_q2p = total / (k_eff[:, None].clamp(min=1) * n_t.clamp(min=1))
    return s_p2q, s_q2p


def _normalised_tokens(img_tokens: Tensor, txt_tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-length tokens, the cosine's operands. Padding is zeroed before normalising: its values then cannot leak
    into anything, not even as NaN through the GEMM's backward (0 · NaN), whatever the encoder left there."""
    return F.normalize(img_tokens, dim=-1), F.normalize(torch.where(mask[..., None], txt_tokens, 0.0), dim=-1)


def token_similarity(img_tokens: Tensor, txt_tokens: Tensor, txt_mask: Tensor, img_mask: Tensor | None = None
                     ) -> Tensor:
    """cos(w_l, v_k) of every text token with every visual token **of the same pair**: (B, N_t, N_i).

    The matrix whose per-row / per-column top-j eqs. 3-4 average (for pair b, :func:`fine_grained_similarity`'s
    S_q2p[b, b] is the mean over real rows of each row's top-j mean). Row l is what HFAM trains text token l to
    look like across the image: explanations draw it as the token's heat map over the regions. Padding rows are 0.

    Args:
        img_tokens: (B, N_i, D) visual tokens without [CLS]; txt_tokens: (B, N_t, D) without [CLS];
        txt_mask: (B, N_t), true for real text tokens.
    """
    _check_tokens(img_tokens, txt_tokens, txt_mask, 1)
    if img_tokens.shape[0] != txt_tokens.shape[0]:
        raise ValueError(f"expected matched pairs, got {img_tokens.shape[0]} images and {txt_tokens.shape[0]} texts")
    img, txt = _normalised_tokens(img_tokens, txt_tokens, txt_mask.bool())
    if img_mask is not None:  # padding columns (tags) are 0 too
        img = torch.where(img_mask.bool()[..., None], img, 0.0)
    return txt @ img.transpose(1, 2)


def _fine_grained(img_tokens: Tensor, txt_tokens: Tensor, txt_mask: Tensor, top_j: int, chunk_size: int | None,
                  p2q: bool = True, q2p: bool = True, img_mask: Tensor | None = None
                  ) -> tuple[Tensor | None, Tensor | None]:
    _check_tokens(img_tokens, txt_tokens, txt_mask, top_j)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    mask = txt_mask.bool()
    img, txt = _normalised_tokens(img_tokens, txt_tokens, mask)
    if img_mask is not None:
        if img_mask.shape != img_tokens.shape[:2]:
            raise ValueError(f"img_mask shape {tuple(img_mask.shape)} != image tokens' {tuple(img_tokens.shape[:2])}")
        img_mask = img_mask.bool()
        img = torch.where(img_mask[..., None], img, 0.0)

    bi, bt = img.shape[0], txt.shape[0]
    step_i = bi if chunk_size is None else chunk_size
    step_t = bt if chunk_size is None else chunk_size
    rows_p, rows_q = [], []
    for i0 in range(0, bi, step_i):  # loops over chunks, not samples: a single pass when chunk_size is None
        cols_p, cols_q = [], []
        for t0 in range(0, bt, step_t):
            p, q = _fine_grained_block(img[i0:i0 + step_i], txt[t0:t0 + step_t], mask[t0:t0 + step_t], top_j, p2q, q2p,
                                       None if img_mask is None else img_mask[i0:i0 + step_i])
            cols_p.append(p)
            cols_q.append(q)
        rows_p.append(torch.cat(cols_p, dim=1) if p2q else None)
        rows_q.append(torch.cat(cols_q, dim=1) if q2p else None)
    return (torch.cat(rows_p, dim=0) if p2q else None), (torch.cat(rows_q, dim=0) if q2p else None)


def fine_grained_similarity(img_tokens: Tensor, txt_tokens: Tensor, txt_mask: Tensor, top_j: int,
                            chunk_size: int | None = None, img_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-wise image↔text similarities of every image with every text (INFIG eqs. 3-4).

    Args:
        img_tokens: (B_i, N_i, D) visual tokens, [CLS] already removed; all real unless ``img_mask`` says.
        txt_tokens: (B_t, N_t, D) text tokens, [CLS] already removed.
        txt_mask: (B_t, N_t) bool or 0/1, true for real tokens. [SEP] counts as real unless the caller masks it.
            Padding positions are never selected, never counted and their values do not matter.
        top_j: j, the number of best matches summed per token. When a text has fewer than j real tokens
            (or the image fewer than j visual tokens), j_eff = min(j, n_valid) matches are summed and the sum is
            divided by j_eff instead of j, so the score stays an average cosine in [-1, 1] and short texts are not
            penalised. A text with no real token scores 0.
        img_mask: (B_i, N_i), true for real visual tokens (a tags encoder pads its tags); None = all real. Padding
            visual tokens are treated as text padding is.
        chunk_size: compute at most ``chunk_size`` images × ``chunk_size`` texts at a time, bounding the
            (B_i, N_i, B_t, N_t) similarity tensor; the result is the same as without chunking.

    Returns:
        ``(s_i2t, s_t2i)``, both (B_i, B_t) and indexed ``[image, text]``: S_p2q (each visual token's top-j over the
        text, averaged over visual tokens) and S_q2p (each real text token's top-j over the image, averaged over
        real text tokens).
    """
    s_p2q, s_q2p = _fine_grained(img_tokens, txt_tokens, txt_mask, top_j, chunk_size, img_mask=img_mask)
    return s_p2q, s_q2p  # type: ignore[return-value]


class FineGrainedAlignmentLoss(nn.Module):
    """HFAM loss L_f (eqs. 5-6): token-wise InfoNCE in both directions, averaged over the given layers.

    Per layer: ``0.5 · (CE(S_p2q / τ, diag) + CE(S_q2p^T / τ, diag))``.

    Args:
        top_j: j of eqs. 3-4.
        chunk_size: see :func:`fine_grained_similarity`.
        gather: multi-process hook (see the module docstring); with it each process contrasts its own images
            (texts) against the texts (images) of all processes.
    """

    def __init__(self, top_j: int = 2, chunk_size: int | None = None, gather: GatherFn | None = None):
        super().__init__()
        if top_j < 1:
            raise ValueError(f"top_j must be >= 1, got {top_j}")
        self.top_j = top_j
        self.chunk_size = chunk_size
        self.gather = gather

    def forward(self, img_layers: Sequence[Tensor], txt_layers: Sequence[Tensor], txt_mask: Tensor,
                temperature: Tensor | float, img_mask: Tensor | None = None) -> dict[str, Tensor]:
        """
        Args:
            img_layers: per layer, (B, N_i, D) visual tokens without [CLS].
            txt_layers: per layer, (B, N_t, D) text tokens without [CLS]; same layers, same order.
            txt_mask: (B, N_t), true for real text tokens.
            temperature: τ, e.g. ``LearnableTemperature()()``.
            img_mask: (B, N_i), true for real visual tokens (tags); None = all real.

        Returns:
            ``{"loss_f": L_f, "f_layer{i}": detached loss of the i-th given layer, ...}``.
        """
        if len(img_layers) != len(txt_layers) or not img_layers:
            raise ValueError(f"need the same, non-zero number of image and text layers, "
                             f"got {len(img_layers)} and {len(txt_layers)}")
        tau = _as_temperature(temperature)
        batch = img_layers[0].shape[0]
        if txt_mask.shape[0] != batch or any(x.shape[0] != batch for x in (*img_layers, *txt_layers)):
            raise ValueError("image and text batches must hold the same pairs (equal batch sizes)")
        offset = 0
        if self.gather is not None:
            mask_all, offset = self.gather(txt_mask)
            img_mask_all = self.gather(img_mask)[0] if img_mask is not None else None
            # Every layer in one gather per modality: (B, M, N, D), fewer collectives per step.
            img_all = self.gather(torch.stack(list(img_layers), 1))[0].unbind(1)
            txt_all = self.gather(torch.stack(list(txt_layers), 1))[0].unbind(1)
        targets = offset + torch.arange(batch, device=txt_mask.device)

        losses = []
        for m, (img, txt) in enumerate(zip(img_layers, txt_layers, strict=True)):
            if self.gather is None:
                s_p2q, s_q2p = _fine_grained(img, txt, txt_mask, self.top_j, self.chunk_size, img_mask=img_mask)
                logits_i2t, logits_t2i = s_p2q, s_q2p.T
            else:
                # Local images against every process's texts, and local texts against every process's images.
                logits_i2t, _ = _fine_grained(img, txt_all[m], mask_all, self.top_j, self.chunk_size, q2p=False,
                                              img_mask=img_mask)
                _, s_q2p = _fine_grained(img_all[m], txt, txt_mask, self.top_j, self.chunk_size, p2q=False,
                                         img_mask=img_mask_all)
                logits_t2i = s_q2p.T
            losses.append(0.5 * (F.cross_entropy(logits_i2t / tau, targets) + F.cross_entropy(logits_t2i / tau, targets)))

        out = {"loss_f": torch.stack(losses).mean()}
        out.update({f"f_layer{i}": loss.detach() for i, loss in enumerate(losses)})
        return out

    def extra_repr(self) -> str:
        return f"top_j={self.top_j}, chunk_size={self.chunk_size}"


# ----------------------------------------------------------------------------------------------------------------
# Momentum encoders and queues (GAM)
# ----------------------------------------------------------------------------------------------------------------


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` for use as its momentum (EMA) twin: same weights, no gradients."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


@torch.no_grad()
def momentum_update(online: nn.Module, momentum: nn.Module, m: float) -> None:
    """EMA step ``θ_m ← m·θ_m + (1 − m)·θ`` over all parameters; buffers (e.g. norm statistics) are copied.

    Both modules must have the same structure (as :func:`make_momentum_copy` makes them).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    params, params_m = dict(online.named_parameters()), dict(momentum.named_parameters())
    buffers, buffers_m = dict(online.named_buffers()), dict(momentum.named_buffers())
    if params.keys() != params_m.keys() or buffers.keys() != buffers_m.keys():
        raise ValueError("online and momentum modules differ in structure")
    if params:
        names = list(params)
        # lerp(θ_m, θ, 1 − m) = θ_m + (1 − m)(θ − θ_m): one fused kernel over all tensors instead of a Python loop.
        torch._foreach_lerp_([params_m[n] for n in names], [params[n] for n in names], 1.0 - m)
    for name, buf in buffers.items():
        buffers_m[name].copy_(buf)


class FeatureQueue(nn.Module):
    """A FIFO ring buffer of L2-normalised features (and optional sample ids), as in MoCo / ALBEF.

    It starts empty and only its filled slots are ever returned, so early steps do not contrast against zero or
    random rows. Batches of any size are accepted: a last batch smaller than the others, wrap-around at the end, and
    a batch larger than the queue (its newest ``size`` rows are kept).

    Args:
        size: Q, the capacity.
        dim: feature width D.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got {size} and {dim}")
        self.capacity, self.dim = size, dim
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("queue_ids", torch.full((size,), -1, dtype=torch.long))  # -1: no id
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """Number of filled slots (grows to the capacity, then stays there)."""
        return int(self.filled)

    def features(self) -> Tensor:
        """(size, D) the stored features, a copy (the queue is updated in place while autograd may hold them)."""
        return self.queue[: self.size].clone()

    def sample_ids(self) -> Tensor:
        """(size,) the ids stored with :meth:`features` (-1 where none was given), a copy."""
        return self.queue_ids[: self.size].clone()

    @torch.no_grad()
    def enqueue(self, feats: Tensor, ids: Tensor | None = None) -> None:
        """Store ``feats`` (N, D), detached and normalised, overwriting the oldest entries.

        Args:
            ids: optional (N,) non-negative sample ids stored alongside (see ``GlobalAlignmentLoss(ids=...)``).
        """
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {tuple(feats.shape)}")
        if ids is not None and ids.shape != feats.shape[:1]:
            raise ValueError(f"ids shape {tuple(ids.shape)} != ({feats.shape[0]},)")
        total = feats.shape[0]
        if total == 0:
            return
        # Only the newest Q rows of an oversized batch survive; they go where writing all of them would have left
        # them, so the invariant "the r-th row ever enqueued sits in slot r mod Q" always holds.
        skip = max(0, total - self.capacity)
        feats = feats[skip:]
        ids = ids[skip:] if ids is not None else None
        n = total - skip
        # Slot indices computed on the device: wrap-around without a host sync or a branch.
        slots = (self.ptr + skip + torch.arange(n, device=self.ptr.device)) % self.capacity
        self.queue.index_copy_(0, slots, F.normalize(feats.detach(), dim=-1).to(self.queue.dtype))
        new_ids = ids.detach().to(torch.long) if ids is not None else torch.full((n,), -1, dtype=torch.long)
        self.queue_ids.index_copy_(0, slots, new_ids.to(self.queue_ids.device))
        self.ptr.copy_((self.ptr + total) % self.capacity)
        self.filled.copy_((self.filled + n).clamp(max=self.capacity))

    def extra_repr(self) -> str:
        return f"size={self.capacity}, dim={self.dim}"


class GlobalAlignmentLoss(nn.Module):
    """GAM loss L_g (eqs. 1-2): InfoNCE of online global features against momentum features + queue (ALBEF ITC).

    ``L_g = 0.5 · (L_i2t + L_t2i)`` with ``L_i2t = CE(norm(i) · [norm(t_m) ; queue_t]^T / τ, targets)``. The targets
    are the matching momentum feature of the current batch (hard InfoNCE); with ``alpha > 0`` they are mixed with
    the momentum model's own softmax, ALBEF's momentum distillation. In training mode the momentum features are
    enqueued after the loss is computed (never in eval mode, so evaluation does not fill the queue with eval data).

    Args:
        dim: feature width D.
        queue_size: Q.
        temperature: initial value of a new learnable τ, or a :class:`LearnableTemperature` to share.
        alpha: momentum-distillation weight (ALBEF default for pre-training 0.4; 0 = hard targets).
        gather: multi-process hook for the momentum features (see the module docstring).
    """

    def __init__(self, dim: int, queue_size: int, temperature: float | LearnableTemperature = 0.07, alpha: float = 0.0,
                 gather: GatherFn | None = None):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature = (temperature if isinstance(temperature, LearnableTemperature)
                            else LearnableTemperature(float(temperature)))
        self.image_queue = FeatureQueue(queue_size, dim)
        self.text_queue = FeatureQueue(queue_size, dim)
        self.alpha = alpha
        self.gather = gather

    def forward(self, img_feat: Tensor, txt_feat: Tensor, img_feat_m: Tensor, txt_feat_m: Tensor,
                ids: Tensor | None = None) -> dict[str, Tensor]:
        """
        Args:
            img_feat, txt_feat: (B, D) online global features i_g, t_g (normalised here).
            img_feat_m, txt_feat_m: (B, D) the momentum encoders' features of the same pairs (normalised here,
                never differentiated).
            ids: optional (B,) non-negative sample ids. Every key (in the batch or the queue) with the same id is
                then a positive (targets spread uniformly over them, as in BLIP): with a queue as large as the
                training set, a sample's own features from earlier epochs would otherwise be negatives.

        Returns:
            ``{"loss_g": L_g, "g_i2t": ..., "g_t2i": ... (detached), "tau": τ (detached)}``.
        """
        if not (img_feat.shape == txt_feat.shape == img_feat_m.shape == txt_feat_m.shape) or img_feat.ndim != 2:
            raise ValueError("global features must all have the same (B, D) shape, got "
                             f"{[tuple(x.shape) for x in (img_feat, txt_feat, img_feat_m, txt_feat_m)]}")
        tau = self.temperature()
        img, txt = F.normalize(img_feat, dim=-1), F.normalize(txt_feat, dim=-1)
        batch = img.shape[0]
        with torch.no_grad():
            img_m, txt_m = F.normalize(img_feat_m.detach(), dim=-1), F.normalize(txt_feat_m.detach(), dim=-1)
            ids_m, offset = ids, 0
            if self.gather is not None:  # the keys of the global batch, in rank order (no gradient: detached)
                keys, offset = self.gather(torch.cat([img_m, txt_m], 1))
                img_m, txt_m = keys.split([img_m.shape[1], txt_m.shape[1]], 1)
                ids_m = self.gather(ids)[0] if ids is not None else None
            img_keys = torch.cat([img_m, self.image_queue.features().to(img_m.dtype)])
            txt_keys = torch.cat([txt_m, self.text_queue.features().to(txt_m.dtype)])
            targets_i2t, targets_t2i = self._targets(batch, offset, img_m, txt_m, img_keys, txt_keys, ids, ids_m,
                                                     tau)

        loss_i2t = F.cross_entropy(img @ txt_keys.T / tau, targets_i2t)
        loss_t2i = F.cross_entropy(txt @ img_keys.T / tau, targets_t2i)

        if self.training:  # every process enqueues the same gathered keys: the queues never diverge
            self.image_queue.enqueue(img_m, ids_m)
            self.text_queue.enqueue(txt_m, ids_m)
        return {"loss_g": 0.5 * (loss_i2t + loss_t2i), "g_i2t": loss_i2t.detach(), "g_t2i": loss_t2i.detach(),
                "tau": tau.detach()}

    def _targets(self, batch: int, offset: int, img_m: Tensor, txt_m: Tensor, img_keys: Tensor, txt_keys: Tensor,
                 ids: Tensor | None, ids_m: Tensor | None, tau: Tensor) -> tuple[Tensor, Tensor]:
        """Class indices (hard InfoNCE, the common case) or (B, K) probabilities."""
        device = img_keys.device
        index = offset + torch.arange(batch, device=device)  # this process's momentum rows in the keys
        if ids is None and self.alpha == 0.0:
            return index, index
        if ids is None:
            hard = torch.zeros(batch, img_keys.shape[0], device=device, dtype=img_keys.dtype)
            hard[torch.arange(batch, device=device), index] = 1.0
        else:
            key_ids = torch.cat([ids_m, self.image_queue.sample_ids().to(device)])  # both queues hold the same ids
            hard = (ids[:, None].to(device) == key_ids[None, :]).to(img_keys.dtype)
            hard = hard / hard.sum(dim=1, keepdim=True)  # the diagonal is always a positive: no division by zero
        if self.alpha == 0.0:
            return hard, hard
        # ALBEF momentum distillation: the momentum model's own similarity distribution as soft targets.
        soft_i2t = F.softmax(img_m[index] @ txt_keys.T / tau, dim=1)
        soft_t2i = F.softmax(txt_m[index] @ img_keys.T / tau, dim=1)
        return (self.alpha * soft_i2t + (1 - self.alpha) * hard,
                self.alpha * soft_t2i + (1 - self.alpha) * hard)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
