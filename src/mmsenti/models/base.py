"""Base class of every mmsenti model, model building, and whether a model's answer for a post depends on its batch.

A model describes itself next to its code, so that the services around it never ask which model they run: its
config declares its inputs, whether its answers depend on the batch, and its card fields
(:class:`~mmsenti.config.ModelConfig`); the model class declares its training-only modules, its frozen parts for
the feature cache, the blocks worth compiling, what an explanation adds (:meth:`MultimodalModel.explain_forward`)
and what export needs (:meth:`MultimodalModel.export_check`, :meth:`MultimodalModel.graph_mode`, ...).

A trained model is saved as a folder: :mod:`mmsenti.models.folder` writes and reads it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmsenti.config import ModelConfig
from mmsenti.errors import DataError, ExportError
from mmsenti.losses import task_loss
from mmsenti.models.explanations import Explained
from mmsenti.models.layers import AttentionPool, TransformerBlock

log = logging.getLogger(__name__)


@dataclass
class TaskInfo:
    """What a model needs to know about its data's labels."""

    task: str  # "classification" | "regression"
    label_names: list[str] | None

    @property
    def num_outputs(self) -> int:
        return len(self.label_names) if self.task == "classification" and self.label_names else 1


class MultimodalModel(nn.Module):
    """``forward(batch) -> {"logits": ..., ...}``; ``compute_loss(outputs, batch) -> {"loss_*": ...}``.

    Subclasses set ``backbone_prefixes`` (parameter-name prefixes of pretrained backbones, trained at
    ``optim.backbone_lr``) and may extend ``no_weight_decay`` (names of tokens/embeddings never decayed).

    A model with parts only training reads (momentum encoders, queues, a frozen teacher) names them in
    :meth:`training_only_modules` and does not build them when built with ``inference=True``: the saved model
    (``model.safetensors``) holds only what ``forward`` reads in eval mode, and loads strictly into such a build.
    Training checkpoints keep the whole state.
    """

    backbone_prefixes: tuple[str, ...] = ()
    # Blocks that ``run.compile`` compiles in place (outermost matches; HF transformer layers always are).
    compiled_blocks: tuple[type[nn.Module], ...] = (TransformerBlock, AttentionPool)

    def __init__(self, cfg: ModelConfig, info: TaskInfo, inference: bool = False):
        super().__init__()
        self.config = cfg
        self.info = info
        self.inference = inference  # built for prediction only (no training-only parts)
        self.criterion = task_loss(info.task, cfg.label_smoothing)

    def training_only_modules(self) -> tuple[str, ...]:
        """Names of submodules that only training reads: left out of the saved model and of an inference build."""
        return ()

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The state ``forward`` reads in eval mode: the state dict without :meth:`training_only_modules`."""
        drop = tuple(f"{name}." for name in self.training_only_modules())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(drop)}

    @property
    def supports_missing_modality(self) -> bool:
        """Whether ``forward`` honours ``image_present`` / ``text_present`` batch masks (a post lacking one)."""
        return False

    def _check_trainable(self) -> None:
        if self.inference:
            raise RuntimeError(f"{type(self).__name__} was built for inference (no training-only parts); "
                               "build it with inference=False to train it")

    def compute_loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.criterion(outputs, batch)

    def no_weight_decay(self) -> set[str]:
        return set()

    # ------------------------------------------------------------------------------ frozen-feature cache
    # A model reads cached features through its encoders' ``encode_batch``; these methods tell the cache what to
    # store. The defaults cover ``self.text_encoder`` / ``self.image_encoder``; models with other frozen parts
    # (INFIG's CLIP) extend them.
    def _cacheable_encoders(self) -> tuple[Any, Any]:
        from mmsenti.models.encoders import ImageEncoder, TextEncoder

        te, ie = getattr(self, "text_encoder", None), getattr(self, "image_encoder", None)
        return (te if isinstance(te, TextEncoder) and te.cacheable else None,
                ie if isinstance(ie, ImageEncoder) and ie.cacheable else None)

    def cache_spec(self) -> dict[str, str]:
        """Batch keys the cache can supply: ``"tokens"`` (one row per real text token) or ``"fixed"`` (per sample)."""
        from mmsenti.models.encoders import text_state_key

        te, ie = self._cacheable_encoders()
        spec = {text_state_key(i): "tokens" for i in te.cached_state_indices()} if te is not None else {}
        if ie is not None:
            spec.update(ie.cache_keys())
        return spec

    def cache_replaces(self) -> set[str]:
        """Raw batch inputs that are not needed when the cache supplies the features (images are then not read)."""
        ie = self._cacheable_encoders()[1]
        return ie.cache_replaces() if ie is not None else set()

    def cache_modules(self) -> dict[str, nn.Module]:
        """The frozen modules whose weights determine the cached features (hashed into the cache key)."""
        te, ie = self._cacheable_encoders()
        out = {}
        if te is not None:
            out["text"] = te.backbone
        if ie is not None:
            backbone = getattr(ie, "backbone", None)  # None: a tags encoder of the vocabulary (its table is frozen)
            out["image"] = backbone if backbone is not None else ie
        return out

    @torch.no_grad()
    def compute_cached(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The cacheable features of a batch (eval mode), keyed as in :meth:`cache_spec`."""
        te, ie = self._cacheable_encoders()
        out = te.compute_cached(batch["input_ids"], batch["attention_mask"]) if te is not None else {}
        if ie is not None:
            out.update(ie.compute_cached_batch(batch))
        return out

    # ---------------------------------------------------------------------------------------------- explain
    @torch.no_grad()
    def explain_forward(self, batch: dict[str, Any], options: Any) -> Explained:
        """The eval-mode forward pass of an explanation of ``batch`` (one post), with what this model adds to every
        model's explanation (modality attribution and Integrated Gradients, which need nothing of the model):
        word → region maps, retrieved neighbours, notes. ``options``: the :class:`~mmsenti.explain.ExplainOptions`."""
        return Explained(self(batch))

    def tag_states_layer(self) -> nn.Module | None:
        """The layer whose output is the per-tag embeddings (B, max_tags, width) of a model that reads the image as
        its tags (Integrated Gradients attribute to it, one attribution per tag); None when it reads no tags."""
        enc = getattr(self, "image_encoder", None)
        return enc.tag_states_layer() if enc is not None else None

    @property
    def lists_neighbours(self) -> bool:
        """Whether explanations list retrieved training samples (whose texts the explain command can load)."""
        return False

    # ----------------------------------------------------------------------------------------------- export
    def export_check(self) -> None:
        """Raise :class:`~mmsenti.errors.ExportError` when a fixed graph cannot reproduce this model's answers."""
        check_per_post(self.config, "exported", ExportError)  # no fixed graph reproduces a batch-dependent answer

    def export_outputs(self) -> list[tuple[str, str, list[int | str]]]:
        """Graph outputs besides ``logits``: (name, numpy dtype, shape; a string axis is dynamic)."""
        return []

    @contextlib.contextmanager
    def graph_mode(self) -> Iterator[Callable[[], tuple[torch.Tensor, ...]]]:
        """While exporting: parts that do not trace as they are run in their graph form (submodules with a
        ``graph_mode()`` of their own: a timm CNN on the whole batch). Yields a function that returns the
        :meth:`export_outputs` of the last forward pass; the eager model is put back afterwards."""
        with contextlib.ExitStack() as stack:
            for m in self.modules():
                if m is not self and callable(getattr(m, "graph_mode", None)):
                    stack.enter_context(m.graph_mode())
            yield tuple

    def export_reference(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The eager model's :meth:`export_outputs` for ``batch``: what the graph's must equal (parity)."""
        return {}

    def export_info(self) -> dict[str, Any]:
        """Entries of ``export.json`` that describe this model's graph (e.g. ``retrieval``: its memory bank)."""
        return {}


def build_model(cfg: ModelConfig, info: TaskInfo, processor, load_weights: bool = True,
                inference: bool = False) -> MultimodalModel:
    """Instantiate the registered model ``cfg.name``.

    Args:
        load_weights: fetch pretrained backbone weights; False when a checkpoint is loaded right after.
        inference: build only what eval-mode ``forward`` reads (see :meth:`MultimodalModel.training_only_modules`).
    """
    from mmsenti.registry import MODELS

    builder = MODELS.get(cfg.name).builder
    return builder(cfg, info, processor, load_weights=load_weights, **({"inference": True} if inference else {}))


def depends_on_batch(model_config: Any) -> bool:
    """Whether the model's answer for a post depends on the other posts of its batch (its config says so:
    ``ModelConfig.batch_dependence``; e.g. RAHP with ``retrieval: in-batch``).

    The service batches the posts of different clients, batch prediction regroups rows by length, an
    explanation's Integrated Gradients batch interpolated copies of one post, and an exported graph has no batch to
    retrieve from. Evaluation (whole splits in the training's batches) is where such a model is meant to be scored.
    """
    return model_config.batch_dependence() is not None


def check_per_post(model_config: Any, what: str, error: type[Exception] = DataError) -> None:
    """Refuse a model whose answer for a post depends on its batch (:func:`depends_on_batch`): raise ``error``
    saying it cannot be ``what`` ("served", "exported", ...), and why, in one line. Every command that needs
    per-post answers calls this, so the rule and its message live here only."""
    dependence = model_config.batch_dependence()
    if dependence is not None:
        subject, why = dependence
        raise error(f"{subject} cannot be {what}: {why}")
