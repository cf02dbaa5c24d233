"""Run a model over a split and score it: shared by the trainer, `mmsenti evaluate` and `predict`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from mmsenti.losses import total_loss
from mmsenti.metrics import compute_metrics
from mmsenti.utils import autocast


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def predict_batches(model, batches: Iterable[dict], device: torch.device, amp_dtype=None) -> Iterator[dict]:
    """Yield ``{"ids", "logits", "labels", "loss"}`` (numpy / None) for each batch, in eval mode."""
    model.eval()
    for batch in batches:
        batch = move(batch, device)
        with autocast(device, amp_dtype):
            out = model(batch)
            has_labels = "labels" in batch
            loss = total_loss(model.compute_loss(out, batch)).item() if has_labels else None
        yield {"ids": batch["ids"], "logits": out["logits"].float().cpu().numpy(),
               "labels": batch["labels"].cpu().numpy() if has_labels else None, "loss": loss}


def scores_to_predictions(task: str, logits: np.ndarray) -> np.ndarray:
    return logits.argmax(-1) if task == "classification" else logits[:, 0]


def evaluate(model, batches: Iterable[dict], device: torch.device, amp_dtype=None) -> dict:
    """Metrics over all ``batches`` (task-specific, see :mod:`mmsenti.metrics`) plus the mean ``loss``."""
    logits, labels, losses, sizes = [], [], [], []
    for r in predict_batches(model, batches, device, amp_dtype):
        logits.append(r["logits"])
        labels.append(r["labels"])
        losses.append(r["loss"])
        sizes.append(len(r["ids"]))
    task = model.info.task
    preds = scores_to_predictions(task, np.concatenate(logits))
    metrics = compute_metrics(task, np.concatenate(labels), preds, model.info.label_names)
    metrics["loss"] = float(np.average(losses, weights=sizes))
    return metrics
