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


def evaluate(model, batches: Iterable[dict], device: torch.device, amp_dtype=None, dist=None) -> dict:
    """Metrics over all ``batches`` (task-specific, see :mod:`mmsenti.metrics`) plus the mean ``loss``.

    Multi-process (``dist``, a :class:`mmsenti.distributed.Distributed`): ``batches`` are this process's
    round-robin share of the split's batches (see ``Setup.eval_loader``). Each process scores whole batches, the
    results are gathered back into the split's order and every process computes the metrics of the whole split:
    the same batches as one process, so the same metrics, with no padding duplicates to drop.
    """
    records = [(r["logits"], r["labels"], r["loss"], len(r["ids"])) for r in predict_batches(model, batches, device,
                                                                                              amp_dtype)]
    if dist is not None:
        records = dist.gather_interleaved(records)
    logits, labels, losses, sizes = zip(*records, strict=True)
    task = model.info.task
    preds = scores_to_predictions(task, np.concatenate(logits))
    metrics = compute_metrics(task, np.concatenate(labels), preds, model.info.label_names)
    metrics["loss"] = float(np.average(losses, weights=sizes))
    return metrics
