"""Models by name: :func:`create_model` (the library's public factory, as open_clip's
``create_model_and_transforms``) and the tiny variants every registered model declares (as timm's ``test_*``
models).

A variant is a registered model under another name with other defaults (:class:`mmsenti.registry.Variant`);
``<model>-tiny`` is the model with small widths, layers and vocabulary, declared in one line at the end of the
model's module with :func:`register_tiny`. It trains in seconds on a CPU: the tests use it, and so can a demo or a
smoke run (``--set model.name=infig-tiny``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mmsenti.config import Config, ModelConfig, build_config, merge
from mmsenti.errors import ConfigError
from mmsenti.models.base import MultimodalModel, TaskInfo, build_model
from mmsenti.models.encoders import build_processor, is_tiny_text
from mmsenti.registry import MODELS

if TYPE_CHECKING:
    from mmsenti.data.processing import Processor

log = logging.getLogger(__name__)

# What every tiny variant shares: a one-layer from-scratch text encoder and a narrow CNN on 32-pixel images.
# (The built-in scenes texts give a word-piece vocabulary of ~150 pieces, under vocab_size.)
TINY_ENCODERS: dict[str, Any] = {
    "text_encoder": {"width": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
    "image_encoder": {"width": 8, "image_size": 32},
}


def register_tiny(base: str, **settings: Any) -> None:
    """Register ``<base>-tiny``: model ``base`` with :data:`TINY_ENCODERS` and ``settings`` (its own small widths
    and layer counts; nested sections as mappings), e.g. ``register_tiny("rahp", width=16, heads=2)``."""
    MODELS.register_variant(f"{base}-tiny", base, merge(TINY_ENCODERS, settings),
                            description=f"{base} with small widths, layers and vocabulary (trains in seconds on a CPU)")


def nest_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"text_encoder__width": 48, "width": 16}`` → ``{"text_encoder": {"width": 48}, "width": 16}``."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split("__")
        if not all(parts):
            raise ConfigError(f"create_model: bad setting name {key!r} (a nested setting is section__key)")
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        out = merge(out, nested)
    return out


def resolve_model_config(name_or_config: str | ModelConfig | Config, **overrides: Any) -> ModelConfig:
    """The typed model config :func:`create_model` builds: a registered model or variant name, or a config, with
    ``overrides`` (see :func:`create_model`) on top, checked as a config file's ``model`` section is."""
    if isinstance(name_or_config, Config):
        name_or_config = name_or_config.model
    if isinstance(name_or_config, ModelConfig):
        section = dataclasses.asdict(name_or_config)
    elif isinstance(name_or_config, str):
        section = {"name": name_or_config}
    else:
        raise TypeError(f"create_model: expected a model name or a config, got {type(name_or_config).__name__}")
    return build_config({"model": merge(section, nest_overrides(overrides))}).model


def create_model(name_or_config: str | ModelConfig | Config, *, texts: Sequence[str] = (),
                 label_names: Sequence[str] | None = ("negative", "neutral", "positive"),
                 task: str = "classification", load_weights: bool = True, inference: bool = False,
                 **overrides: Any) -> tuple[MultimodalModel, Processor]:
    """Build a registered model and the processor that makes its batches.

    Example::

        model, processor = mmsenti.create_model("infig-tiny", width=64, text_encoder__num_layers=2)
        outputs = model(processor(samples))  # samples: mmsenti.data.base.Sample posts

    Args:
        name_or_config: a registered model or variant name (``mmsenti list models``: ``infig``, ``infig-tiny``),
            a :class:`~mmsenti.config.ModelConfig`, or a :class:`~mmsenti.config.Config` (its ``model`` section).
        texts: training texts; a from-scratch text encoder (``tiny-bert``) learns its word-piece vocabulary on them
            (without them every word is ``[UNK]``: enough to check shapes, not to train).
        label_names: the classes (their number sizes the output); ``None`` for regression.
        task: ``"classification"`` or ``"regression"`` (one output).
        load_weights: read pretrained backbone weights; False when a checkpoint is loaded right after.
        inference: build only what eval-mode ``forward`` reads (no training-only parts such as momentum encoders).
        **overrides: settings of the model's config section over the name's (or config's) own, as keyword
            arguments: ``width=64``; nested sections with a double underscore, ``text_encoder__width=48`` (the
            ``--set model.text_encoder.width=48`` of the command line), or as a mapping, ``text_encoder={...}``.

    Returns:
        ``(model, processor)``: the model in training mode (``model.config`` is its resolved config, naming the
        registered model: a variant resolves to its model with the variant's settings) and its
        :class:`~mmsenti.data.processing.Processor`.

    Raises:
        ConfigError: an unknown name or setting, or a value of the wrong type (one line naming it).
    """
    cfg = resolve_model_config(name_or_config, **overrides)
    if not texts and "input_ids" in cfg.batch_inputs(False) and is_tiny_text(cfg.text_encoder):
        log.warning("create_model: no texts for %s's word-piece vocabulary: every word reads as [UNK]", cfg.name)
    processor = build_processor(cfg, list(texts), task)
    info = TaskInfo(task, list(label_names) if label_names is not None else None)
    return build_model(cfg, info, processor, load_weights=load_weights, inference=inference), processor
