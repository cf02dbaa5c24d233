"""Run a model over a split and score it: shared by the trainer and `mmsenti evaluate`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from mmsenti.losses import total_loss
from mmsenti.metrics import Predictions
from mmsenti.utils import autocast, move


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


def evaluate(model, batches: Iterable[dict], device: torch.device, amp_dtype=None,
             save_predictions: str | Path | None = None, dist=None, order: Sequence[int] | None = None) -> dict:
    """Metrics over all ``batches`` (task-specific, see :mod:`mmsenti.metrics`) plus the mean ``loss``.

    ``save_predictions``: also write the per-post :class:`~mmsenti.metrics.Predictions` there (an ``.npz`` file; by rank 0 alone).

    Multi-process (``dist``, a :class:`mmsenti.distributed.Distributed`): ``batches`` are this process's
    round-robin share of the split's batches (see ``Workbench.eval_loader``). Each process scores whole batches, the
    results are gathered back into the split's order and every process computes the metrics of the whole split:
    the same batches as one process, so the same metrics, with no padding duplicates to drop.

    ``order``: each scored post's position in the split (the batches' indices, all processes' batches in turn):
    the predictions are put back in the split's order.
    """
    records = [([str(i) for i in r["ids"]], r["logits"], r["labels"], r["loss"])
               for r in predict_batches(model, batches, device, amp_dtype)]
    if dist is not None:
        records = dist.gather_interleaved(records)
    ids, logits, labels, losses = zip(*records, strict=True)
    preds = Predictions(np.asarray([i for batch in ids for i in batch], dtype=str), np.concatenate(labels),
                        np.concatenate(logits), model.info.task, model.info.label_names)
    if order is not None:
        if len(order) != len(preds.ids):
            raise ValueError(f"order has {len(order)} positions for {len(preds.ids)} scored posts")
        back = np.argsort(np.asarray(order), kind="stable")
        preds = Predictions(preds.ids[back], preds.labels[back], preds.logits[back], preds.task, preds.label_names)
    metrics = preds.metrics()
    metrics["loss"] = float(np.average(losses, weights=[len(batch) for batch in ids]))
    if save_predictions is not None and (dist is None or dist.is_main):
        preds.save(save_predictions)
    return metrics
