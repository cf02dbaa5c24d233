"""The cross-modal supervised contrastive loss that shapes the retrieval embeddings.

Every (sample, modality) retrieval embedding of the batch is an anchor. Its positives are all *other*
(sample', modality') embeddings with the same sentiment: the same sample's other modalities (which aligns the
modalities, so that a text can retrieve by audio or vision), other samples' same modality, and other samples'
other modalities. The objective is the supervised contrastive loss of Khosla et al. (2020), "L_out" form::

    L = mean over anchors a with |P(a)| > 0 of
        -1/|P(a)| * sum_{p in P(a)} log( exp(z_a . z_p / t) / sum_{n in A, n != a} exp(z_a . z_n / t) )

with z the L2-normalised embeddings, A all anchors of the batch (of all ranks, with a ``gather`` hook) and t
the temperature. Unlike the authors' hinge terms it needs no hand-set margins.

Multi-process training: with the gather hook of :data:`mmsenti.distributed.GatherFn` each process's anchors are
contrasted with the embeddings of the whole global batch (gathered differentiably, so gradients reach every
process's encoders), and the mean runs over the anchors of *all* processes. The returned term is this process's
share of that mean, scaled per local sample (see :meth:`CrossModalSupConLoss.forward`), so the trainer's weighting
of processes by their sample counts gives exactly the single-process loss, even when processes hold different
numbers of anchors (missing modalities, anchors without positives).

Sentiment classes: the class index for classification; for regression the *sign* of the score, with 0 counted
as non-negative by default (the "has-0" Acc-2 convention of MOSI/MOSEI: negative < 0 <= non-negative), or as
its own class (``zero="separate"``: a neutral clip is a positive only for other neutral clips). Sign classes
are coarse: they pull every positive clip towards every other, which can wash out finer structure that
retrieval could use; ``regression_classes="rounded"`` uses the 7 Acc-7 classes (score clipped to [-3, 3] and
rounded) instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmsenti.distributed import GatherFn


def sentiment_classes(labels: torch.Tensor, task: str, zero: str = "non-negative",
                      regression_classes: str = "sign") -> torch.Tensor:
    """Integer classes whose equality defines positives: the labels (classification) or the score's sign."""
    if task == "classification":
        return labels.long()
    if task != "regression":
        raise ValueError(f"unknown task '{task}' (known: classification, regression)")
    if regression_classes == "rounded":
        return torch.round(labels.clamp(-3.0, 3.0)).long()  # half to even, like the Acc-7 metric
    if regression_classes != "sign":
        raise ValueError(f"unknown regression_classes '{regression_classes}' (known: sign, rounded)")
    if zero == "non-negative":
        return (labels >= 0).long()
    if zero == "separate":
        return torch.sign(labels).long()
    raise ValueError(f"unknown zero policy '{zero}' (known: non-negative, separate)")


class CrossModalSupConLoss(nn.Module):
    """Supervised contrastive loss over the retrieval embeddings of all modalities jointly.

    Args:
        task: ``"classification"`` (positives share the class) or ``"regression"`` (positives share the sign).
        temperature: softmax temperature t.
        zero: regression sign classes only: ``"non-negative"`` (0 groups with positive scores) or ``"separate"``.
        regression_classes: ``"sign"`` or ``"rounded"`` (the 7 integer scores of Acc-7).
        weight: multiplies the term (the trainer sums the ``loss*`` keys as they are).
        gather: multi-process hook (:data:`mmsenti.distributed.GatherFn`, set by the trainer): contrast this
            rank's anchors with the embeddings of all ranks (see the module docstring).
        normalize: L2-normalise the embeddings first (turn off if the model already does).
    """

    def __init__(self, task: str = "classification", temperature: float = 0.07,
                 zero: Literal["non-negative", "separate"] = "non-negative", weight: float = 1.0,
                 gather: GatherFn | None = None, normalize: bool = True,
                 regression_classes: Literal["sign", "rounded"] = "sign"):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        sentiment_classes(torch.zeros(1), task, zero, regression_classes)  # validate the options now
        self.task, self.temperature, self.zero, self.weight = task, float(temperature), zero, float(weight)
        self.regression_classes = regression_classes
        self.gather, self.normalize = gather, normalize

    def forward(self, embeddings: Mapping[str, torch.Tensor] | torch.Tensor, labels: torch.Tensor,
                present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Compute the loss.

        Args:
            embeddings: ``{modality: (B, D)}`` or a ``(B, M, D)`` tensor of pooled retrieval embeddings.
            labels: ``(B,)`` class indices or scores.
            present: optional ``(B, M)`` bool, False where a sample lacks a modality (neither anchor nor key).

        Returns:
            ``{"loss_ret": weighted loss}`` (0, still attached to the graph, when no anchor has a positive). With a
            gather hook, this process's share: ``(sum of its anchors' losses) / (anchors of all processes) ·
            (samples of all processes) / (its samples)``, so that averaging the processes weighted by their
            sample counts gives the global mean over anchors.
        """
        z = torch.stack(list(embeddings.values()), 1) if isinstance(embeddings, Mapping) else embeddings
        if z.ndim != 3 or z.shape[0] != labels.shape[0]:
            raise ValueError(f"embeddings must be (B, M, D) with B = len(labels); got {tuple(z.shape)}")
        b, m, d = z.shape
        z = z.reshape(b * m, d).float()  # fp32 softmax over the batch even under autocast
        if self.normalize:
            z = F.normalize(z, dim=1)
        cls = sentiment_classes(labels, self.task, self.zero, self.regression_classes).repeat_interleave(m)
        valid = (present.reshape(b * m).bool() if present is not None
                 else torch.ones(b * m, dtype=torch.bool, device=z.device))

        keys, key_cls, key_valid, offset = z, cls, valid, 0
        if self.gather is not None:
            keys, offset = self.gather(z)
            key_cls, _ = self.gather(cls)
            key_valid, _ = self.gather(valid)
        n = z.shape[0]
        self_mask = torch.zeros(n, keys.shape[0], dtype=torch.bool, device=z.device)
        self_mask[torch.arange(n, device=z.device), offset + torch.arange(n, device=z.device)] = True

        others = key_valid[None, :] & ~self_mask
        pos = others & (cls[:, None] == key_cls[None, :])
        n_pos = pos.sum(1)
        anchors = valid & (n_pos > 0)
        n_anchors = anchors.sum()
        if self.gather is not None:  # every process takes part in this gather, whatever its anchors
            counts, _ = self.gather(torch.stack([n_anchors, torch.tensor(b, device=z.device)]).reshape(1, 2))
            total_anchors, total_samples = counts.sum(0).tolist()
            scale = total_samples / (total_anchors * b) if total_anchors else 0.0
        else:
            scale = 1.0 / n_anchors.clamp(min=1)  # the mean over anchors (0 when there is none)
        # The same operations on every process whatever its shard holds (no anchor, no positive, a missing
        # modality): the gathered keys are always part of the graph, so every process runs the gather's backward
        # all-reduce that the others run (a process that skipped it would desynchronise the collectives). Rows that
        # are not anchors score every key, so each log-sum-exp is finite and no NaN reaches the gradients, and are
        # then dropped by masked_fill (not a product: 0 · inf would be NaN).
        logits = ((z @ keys.T) / self.temperature).masked_fill(anchors[:, None] & ~others, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp(min=1)
        loss = per_anchor.masked_fill(~anchors, 0.0).sum() * scale
        return {"loss_ret": self.weight * loss}
