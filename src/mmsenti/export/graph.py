"""The exported graph: a thin tensor-only wrapper around the lean inference model.

:class:`GraphModule` takes the model's evaluation inputs as plain tensors, in the order :func:`input_specs` lists
them (each input builder's tensors, e.g. ``input_ids``, ``attention_mask``, ``pixel_values``, ``<m>_features`` +
``<m>_mask``, and for models that can hide a modality ``image_present`` / ``text_present``), builds the batch dict
the model reads and returns its logits, plus any outputs the model adds (:meth:`export_outputs`). No ids, dicts or
Python objects cross the graph's boundary.

What of the eager model cannot become a graph as it is is swapped *while exporting only* by the model itself
(``model.graph_mode()``: a timm CNN's chunked eval loop runs on the whole batch; RAHP's memory bank becomes exact
retrieval against constant vectors); the eager model is never changed. What cannot be exported at all is refused by
``model.export_check()`` with a one-line reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mmsenti.export.format import PRESENT_KEYS, TensorSpec


def input_specs(model: nn.Module, processor) -> list[TensorSpec]:
    """The graph's inputs: the tensors of the processor's evaluation inputs, plus the present-modality flags when the
    model can hide a modality (``--allow-missing-modality``; all true for a complete post)."""
    specs = [TensorSpec(*t) for b in processor.active(training=False) for t in b.graph_inputs()]
    if getattr(model, "supports_missing_modality", False):
        specs += [TensorSpec(k, "bool", ["batch"]) for k in PRESENT_KEYS]
    return specs


def output_specs(model: nn.Module) -> list[TensorSpec]:
    return [TensorSpec("logits", "float32", ["batch", model.info.num_outputs]),
            *(TensorSpec(*t) for t in model.export_outputs())]


class GraphModule(nn.Module):
    """``forward(*tensors)`` in the order of :func:`input_specs` → logits (and the model's other export outputs,
    e.g. the rows of the neighbours RAHP retrieved from its bank). Export it inside :func:`graph_mode`."""

    def __init__(self, model: nn.Module, inputs: list[TensorSpec]):
        super().__init__()
        model.export_check()
        self.model = model.eval()
        self.names = [s.name for s in inputs]
        self._extras = tuple  # the model's other outputs of the last forward (set in graph_mode)

    def forward(self, *tensors: torch.Tensor):
        batch: dict[str, Any] = dict(zip(self.names, tensors, strict=True))
        batch["ids"] = []  # the lean model reads ids only for training-time retrieval exclusion
        logits = self.model(batch)["logits"]
        extras = self._extras()
        return (logits, *extras) if extras else logits


@contextlib.contextmanager
def graph_mode(module: GraphModule) -> Iterator[GraphModule]:
    """Swap the parts of the eager model that do not trace into a graph for their graph forms (the model's
    ``graph_mode``), and put them back afterwards."""
    with module.model.graph_mode() as extras:
        module._extras = extras
        try:
            yield module
        finally:
            module._extras = tuple
