"""Run a model over a split and score it: shared by the trainer, `mmsenti evaluate` and `predict`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Predictions:
    """Per-post outputs of a model on one split: what paired significance tests and plots are computed from.

    Saved as one ``.npz`` (no pickles): ``ids`` (str), ``labels``, ``logits`` (N, C) class scores or (N, 1)
    regression scores, ``task`` and ``label_names`` (JSON).
    """

    ids: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    task: str
    label_names: list[str] | None = None

    def metrics(self, index: np.ndarray | None = None) -> dict:
        """:func:`~mmsenti.metrics.compute_metrics` of these predictions (of the posts ``index`` selects)."""
        labels, logits = (self.labels, self.logits) if index is None else (self.labels[index], self.logits[index])
        return compute_metrics(self.task, labels, scores_to_predictions(self.task, logits), self.label_names)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(tmp, ids=np.asarray(self.ids, dtype=str), labels=self.labels, logits=self.logits,
                            task=np.asarray(self.task), label_names=np.asarray(json.dumps(self.label_names)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Predictions:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["ids"], z["labels"], z["logits"], str(z["task"]), json.loads(str(z["label_names"])))


def evaluate(model, batches: Iterable[dict], device: torch.device, amp_dtype=None,
             save_predictions: str | Path | None = None, dist=None) -> dict:
    """Metrics over all ``batches`` (task-specific, see :mod:`mmsenti.metrics`) plus the mean ``loss``.

    ``save_predictions``: also write the per-post :class:`Predictions` there (an ``.npz`` file; by rank 0 alone).

    Multi-process (``dist``, a :class:`mmsenti.distributed.Distributed`): ``batches`` are this process's
    round-robin share of the split's batches (see ``Setup.eval_loader``). Each process scores whole batches, the
    results are gathered back into the split's order and every process computes the metrics of the whole split:
    the same batches as one process, so the same metrics, with no padding duplicates to drop.
    """
    records = [([str(i) for i in r["ids"]], r["logits"], r["labels"], r["loss"])
               for r in predict_batches(model, batches, device, amp_dtype)]
    if dist is not None:
        records = dist.gather_interleaved(records)
    ids, logits, labels, losses = zip(*records, strict=True)
    preds = Predictions(np.asarray([i for batch in ids for i in batch], dtype=str), np.concatenate(labels),
                        np.concatenate(logits), model.info.task, model.info.label_names)
    metrics = preds.metrics()
    metrics["loss"] = float(np.average(losses, weights=[len(batch) for batch in ids]))
    if save_predictions is not None and (dist is None or dist.is_main):
        preds.save(save_predictions)
    return metrics
