"""Task losses. Every loss is an ``nn.Module`` returning a dict of named terms; the total is their sum.

Keys starting with ``loss`` are summed by the trainer (already weighted); other keys are logged diagnostics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationLoss(nn.Module):
    """Cross-entropy on ``outputs["logits"]``: the sentiment-classification term L_sc."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss_sc": F.cross_entropy(outputs["logits"], batch["labels"], label_smoothing=self.label_smoothing)}


class RegressionLoss(nn.Module):
    """L1 on ``outputs["logits"][:, 0]`` (the sentiment score), as MMSA trains MOSI/MOSEI models."""

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss_reg": F.l1_loss(outputs["logits"][:, 0], batch["labels"].to(outputs["logits"].dtype))}


def task_loss(task: str, label_smoothing: float = 0.0) -> nn.Module:
    return ClassificationLoss(label_smoothing) if task == "classification" else RegressionLoss()


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v for k, v in terms.items() if k.startswith("loss"))
