"""The exported graph: a thin tensor-only wrapper around the lean inference model.

:class:`GraphModule` takes the model's evaluation inputs as plain tensors, in the order :func:`input_specs` lists
them (``input_ids``, ``attention_mask``, ``pixel_values``, ``<m>_features`` + ``<m>_mask``, and for models that can
hide a modality ``image_present`` / ``text_present``), builds the batch dict the model reads and returns its logits.
No ids, dicts or Python objects cross the graph's boundary.

Two things of the eager model cannot become a graph as they are, so they are swapped *while exporting only*
(:func:`graph_mode`); the eager model is never changed:

* a timm CNN in eval mode on the CPU runs its images in chunks of 4 (a cache-friendly loop over
  ``x.split(4)``). Traced, that loop is unrolled for the example batch and the graph breaks at any other batch
  size; in the graph the CNN runs on the whole batch (the same per-image arithmetic).
* RAHP's memory bank is a FAISS or torch index searched in Python; in the graph it is exact retrieval as a matmul
  against the bank's (normalised) vectors and a top-k, with the vectors, neighbour features and labels as
  constants (:class:`BankRetrieval`). The exported RAHP also returns the retrieved bank rows (``neighbours``).

What cannot be exported is refused by :func:`check_exportable` with a one-line reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmsenti.export.format import PRESENT_KEYS, ExportError, TensorSpec


# ------------------------------------------------------------------------------------------------- what exports
def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError` for a model whose answers a fixed graph cannot reproduce."""
    from mmsenti.models.base import check_per_post
    from mmsenti.models.rahp import Rahp

    if not isinstance(model, Rahp):
        return
    check_per_post(model.config, "exported", ExportError)  # no fixed graph reproduces a batch-dependent answer
    if model.config.retrieval != "bank":
        return
    if not model.bank.is_built:
        raise ExportError("rahp: the memory bank is empty (the model was never trained); nothing to retrieve from")
    from mmsenti.retrieval.index import FaissIndex

    for m, index in model.bank.indexes.items():
        if isinstance(index, FaissIndex) and index.kind != "flat":
            raise ExportError(f"rahp: the memory bank's '{m}' index is approximate (FAISS {index.kind}); the graph "
                              "retrieves exactly (matmul + top-k) and would find other neighbours than the model "
                              "does for some posts, so parity cannot hold; export a model whose bank uses "
                              "model.index=torch or flat")


def uses_bank(model: nn.Module) -> bool:
    from mmsenti.models.rahp import Rahp

    return isinstance(model, Rahp) and model.config.retrieval == "bank"


def input_specs(model: nn.Module, processor) -> list[TensorSpec]:
    """The graph's inputs: the processor's evaluation keys, plus the present-modality flags when the model can
    hide a modality (``--allow-missing-modality``; all true for a complete post)."""
    specs = []
    for key in processor.keys(training=False):
        if key in ("input_ids", "attention_mask"):
            specs.append(TensorSpec(key, "int64", ["batch", "sequence"]))
        elif key == "pixel_values":
            size = processor.image_transform.size
            specs.append(TensorSpec(key, "float32", ["batch", 3, size, size]))
        elif key.endswith("_features"):
            m = key[: -len("_features")]
            specs.append(TensorSpec(key, "float32", ["batch", f"{m}_sequence", int(model.config.feature_dims[m])]))
        elif key.endswith("_mask"):
            specs.append(TensorSpec(key, "int64", ["batch", f"{key[: -len('_mask')]}_sequence"]))
        else:
            raise ExportError(f"model input '{key}' has no graph form (known: token ids, pixel values, features)")
    if getattr(model, "supports_missing_modality", False):
        specs += [TensorSpec(k, "bool", ["batch"]) for k in PRESENT_KEYS]
    return specs


def output_specs(model: nn.Module) -> list[TensorSpec]:
    specs = [TensorSpec("logits", "float32", ["batch", model.info.num_outputs])]
    if uses_bank(model):
        m = len(model.modalities)
        specs.append(TensorSpec("neighbours", "int64", ["batch", m, m, int(model.config.k)]))
    return specs


# ------------------------------------------------------------------------------------------------- the wrapper
class BankRetrieval(nn.Module):
    """RAHP's bank search as graph ops: exact top-k of cosine (or inner-product) scores against constant vectors.

    Returns what :meth:`mmsenti.models.rahp.Rahp.retrieve` returns in eval mode (nothing excluded), and keeps the
    retrieved rows of the last call in :attr:`rows`: ``(B, targets, sources, k)``, ``-1`` where the bank holds
    fewer than ``k`` samples. Ties keep the lower row first (ONNX ``TopK``), as the torch index does.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        bank = model.bank
        self.modalities = list(model.modalities)
        self.k = int(model.config.k)
        self.cosine = bank.metric == "cosine"
        for m in self.modalities:
            # Torch and FAISS-flat indexes both store their (already normalised) vectors as "vectors".
            self.register_buffer(f"vectors_{m}", bank.indexes[m].state()[1]["vectors"].float().cpu().clone())
        self.payload_names = sorted(bank.payload)
        for i, name in enumerate(self.payload_names):
            self.register_buffer(f"payload_{i}", bank.payload[name].cpu().clone())
        self.fetch = min(self.k, len(bank))
        self.rows: torch.Tensor | None = None

    def forward(self, enc: dict) -> dict:
        from mmsenti.retrieval import Neighbours

        mods, k = self.modalities, self.k
        queries = torch.cat([enc[m].embedding for m in mods])  # (targets·B, d): one search per index
        if self.cosine:
            queries = F.normalize(queries, dim=1)
        found: dict[str, dict] = {m: {} for m in mods}
        rows_by_source = []
        for s in mods:
            scores, rows = torch.topk(queries @ getattr(self, f"vectors_{s}").T, self.fetch, dim=1)
            if self.fetch < k:  # a bank smaller than k: padding slots, as the index returns them
                scores = torch.cat([scores, scores.new_full((scores.shape[0], k - self.fetch), float("-inf"))], 1)
                rows = torch.cat([rows, rows.new_full((rows.shape[0], k - self.fetch), -1)], 1)
            payload = {}
            for i, name in enumerate(self.payload_names):
                picked = getattr(self, f"payload_{i}")[rows.clamp_min(0)]
                if self.fetch < k:
                    valid = (rows >= 0).reshape(*rows.shape, *([1] * (picked.ndim - 2)))
                    picked = picked.masked_fill(~valid, 0)
                payload[name] = picked
            scores, rows = scores.unflatten(0, (len(mods), -1)), rows.unflatten(0, (len(mods), -1))
            payload = {n: v.unflatten(0, (len(mods), -1)) for n, v in payload.items()}
            for j, m in enumerate(mods):
                found[m][s] = Neighbours(scores[j], rows[j], {n: v[j] for n, v in payload.items()})
            rows_by_source.append(rows)  # (targets, B, k)
        self.rows = torch.stack(rows_by_source, 2).transpose(0, 1)  # (B, targets, sources, k)
        return found


class GraphModule(nn.Module):
    """``forward(*tensors)`` in the order of :func:`input_specs` → logits (and, for RAHP with a bank, the rows of
    the retrieved neighbours). Export it inside :func:`graph_mode`."""

    def __init__(self, model: nn.Module, inputs: list[TensorSpec]):
        super().__init__()
        check_exportable(model)
        self.model = model.eval()
        self.names = [s.name for s in inputs]
        self.retrieval = BankRetrieval(model) if uses_bank(model) else None

    def forward(self, *tensors: torch.Tensor):
        batch: dict[str, Any] = dict(zip(self.names, tensors, strict=True))
        batch["ids"] = []  # the lean model reads ids only for training-time retrieval exclusion
        logits = self.model(batch)["logits"]
        if self.retrieval is None:
            return logits
        return logits, self.retrieval.rows


def _whole_batch(encoder):
    def forward(pixel_values: torch.Tensor):
        return encoder.from_feature_map(encoder.backbone.forward_features(pixel_values))

    return forward


@contextlib.contextmanager
def graph_mode(module: GraphModule) -> Iterator[GraphModule]:
    """Swap the parts of the eager model that do not trace into a graph for their graph forms (see the module
    docstring), and put them back afterwards."""
    from mmsenti.models.encoders import TimmImageEncoder

    model = module.model
    patched = [m for m in model.modules() if isinstance(m, TimmImageEncoder)]
    for m in patched:
        m.forward = _whole_batch(m)
    if module.retrieval is not None:
        retrieval = module.retrieval
        model.retrieve = lambda enc, ids: retrieval(enc)
    try:
        yield module
    finally:
        for m in patched:
            del m.forward
        if module.retrieval is not None:
            del model.retrieve
