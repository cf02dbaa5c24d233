"""Attributions for every model: modality replacement, and Integrated Gradients (Captum) over the text's word
embeddings and the image's pixels (or, for a model that reads the image as tags, the tags' embeddings).

The explained output is p(target) for classification (the predicted label unless told otherwise) and the score for
regression. Every forward pass here runs the model in eval mode on one post, so nothing depends on batch
neighbours, and a modality a model does not read leaves its input, hence its output, bit-for-bit unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from mmsenti.data.base import Sample
from mmsenti.explain.options import ExplainOptions
from mmsenti.explain.results import ImageAttribution, ModalityAttribution, TagAttribution, TextAttribution, Word
from mmsenti.explain.text import pool_words
from mmsenti.utils import move

BATCH_ID = "explain"  # the id every explained forward pass carries (RAHP excludes nothing by id in eval mode)


# ------------------------------------------------------------------------------------------------ model calls
def output_of(logits: torch.Tensor, target: int | None) -> torch.Tensor:
    """(N, C) logits → (N,) p(target), or the score (target None: regression)."""
    if target is None:
        return logits[:, 0].float()
    return logits.float().softmax(-1)[:, target]


def run(model: torch.nn.Module, batch: dict, **kwargs) -> dict:
    with torch.no_grad():
        return model(batch, **kwargs)


def batch_of(processor, sample: Sample, device: torch.device) -> dict:
    """One post → the model's evaluation batch on ``device``."""
    return move(processor([sample], training=False), device)


def _forward_fn(model: torch.nn.Module, batch: dict, key: str, target: int | None
                ) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """Captum's view of the model: ``f(batch[key], *other tensors) -> (N,) output`` and the other tensors (Captum
    repeats them along the batch for the path points)."""
    keys = [k for k, v in batch.items() if k != key and isinstance(v, torch.Tensor)]

    def forward(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        b = {"ids": [BATCH_ID] * x.shape[0], key: x, **dict(zip(keys, others, strict=True))}
        return output_of(model(b)["logits"], target)

    return forward, tuple(batch[k] for k in keys)


# ------------------------------------------------------------------------------------------ neutral inputs
def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., 3, H, W) blurred by a Gaussian of ``sigma`` pixels (separable, reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=pixels.dtype, device=pixels.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    shape = pixels.shape
    img = pixels.reshape(-1, 1, *shape[-2:])
    pad = min(radius, shape[-1] - 1, shape[-2] - 1)
    k = k[radius - pad : radius + pad + 1]
    img = F.conv2d(F.pad(img, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    img = F.conv2d(F.pad(img, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return img.reshape(shape)


def neutral_image(pixels: torch.Tensor, options: ExplainOptions) -> torch.Tensor:
    """The stand-in for an image (its ``pixel_values``): the normalisation mean colour, or the image blurred."""
    if options.image_baseline == "mean":
        return torch.zeros_like(pixels)
    return gaussian_blur(pixels, options.blur_sigma * pixels.shape[-1])


def describe_image_baseline(options: ExplainOptions) -> str:
    if options.image_baseline == "mean":
        return "the mean image: every pixel at the normalisation mean colour (pixel values 0)"
    return f"the image blurred by a Gaussian of σ = {options.blur_sigma:g} × its side"


# ------------------------------------------------------------------------------------- modality attribution
def modality_attribution(model: torch.nn.Module, processor, sample: Sample, modalities: Sequence[str],
                         target: int | None, label_names: list[str] | None, device: torch.device,
                         options: ExplainOptions) -> ModalityAttribution:
    """Replace each modality by a neutral input and compare the outputs.

    ``sample.image`` is the transformed ``pixel_values`` (for a model that reads images). Text → the empty text
    ([CLS] [SEP]); image → :func:`neutral_image`, or for a model that reads the image as tags no tags (every tag
    slot padding, masked as the models mask padding); a feature sequence (audio, vision, text features) → an empty
    sequence. ``modalities``: those to replace (the post's; one the model does not read gets exactly 0).
    """
    features = set(processor.feature_modalities)  # read as (T, D) sequences (e.g. MMSA audio, text features)
    tags = processor.builder("tags") is not None  # the image is read as the post's tags
    image_by = NO_TAGS if tags else describe_image_baseline(options)
    replaced_by = {m: "an empty sequence" if m in features else
                   {"text": "the empty text", "image": image_by}[m] for m in modalities}

    def without(s: Sample, m: str) -> Sample:
        if m in features:
            feats = dict(s.features or {})
            feats[m] = np.zeros((0, np.asarray(feats[m]).shape[1]), dtype=np.float32)
            return replace(s, features=feats)
        if m == "text":
            return replace(s, text="")
        if m == "image" and tags:
            return replace(s, tags=[])
        if m == "image":  # pixel values, or (a model that reads no image) the image it ignores
            return replace(s, image=neutral_image(s.image, options) if isinstance(s.image, torch.Tensor) else None)
        raise ValueError(f"cannot replace modality {m!r}")

    variants = {"full": sample}
    for m in modalities:
        variants[f"without_{m}"] = without(sample, m)
    if len(modalities) == 2:
        variants["without_all"] = without(without(sample, modalities[0]), modalities[1])
    logits = {name: run(model, batch_of(processor, s, device))["logits"].float().cpu() for name, s in variants.items()}
    values = {name: float(output_of(v, target)[0]) for name, v in logits.items()}
    outputs = {name: _decoded(v[0], target, label_names) for name, v in logits.items()}
    effects = {m: values["full"] - values[f"without_{m}"] for m in modalities}
    if len(modalities) == 2:
        a, b = modalities
        effects["interaction"] = (values["full"] - values[f"without_{a}"] - values[f"without_{b}"]
                                  + values["without_all"])
    changes = {m: outputs[f"without_{m}"].get("label") != outputs["full"].get("label") if target is not None
               else False for m in modalities}
    return ModalityAttribution(target=None if target is None else label_names[target], replaced_by=replaced_by,
                               outputs=outputs, values=values, effects=effects, changes_prediction=changes)


def _decoded(logits: torch.Tensor, target: int | None, label_names: list[str] | None) -> dict:
    if target is None:
        return {"score": round(float(logits[0]), 6)}
    p = logits.softmax(-1)
    return {"label": label_names[int(p.argmax())], "probabilities": {n: round(float(v), 6)
                                                                    for n, v in zip(label_names, p, strict=True)}}


# ------------------------------------------------------------------------------------- integrated gradients
def text_integrated_gradients(model: torch.nn.Module, batch: dict, tokenizer, words: Sequence[Word],
                              target: int | None, options: ExplainOptions) -> TextAttribution:
    """Captum ``LayerIntegratedGradients`` on the text encoder's word-embedding layer.

    Baseline: the same input ids with every word piece replaced by [PAD] and the special tokens ([CLS], [SEP])
    kept, same attention mask; position and segment embeddings are the same on the whole path, so only the words'
    identities are attributed.
    """
    from captum.attr import LayerIntegratedGradients

    ids = batch["input_ids"]
    special = torch.tensor(tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True),
                           dtype=torch.bool, device=ids.device)
    baseline = torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id))
    forward, others = _forward_fn(model, batch, "input_ids", target)
    layer = model.text_encoder.backbone.get_input_embeddings()
    with torch.enable_grad():
        attr, delta = LayerIntegratedGradients(forward, layer).attribute(
            ids, baselines=baseline, additional_forward_args=others, n_steps=options.ig_steps,
            internal_batch_size=options.ig_batch, return_convergence_delta=True)
    tokens = attr[0].sum(-1).detach().float().cpu().numpy()
    return TextAttribution(
        method="Integrated Gradients (Captum LayerIntegratedGradients on the text encoder's word embeddings)",
        baseline="each word piece replaced by [PAD], [CLS]/[SEP] and the attention mask kept",
        steps=options.ig_steps, word_scores=pool_words(tokens, words, "sum"), token_scores=tokens,
        delta=float(delta.reshape(-1)[0]))


def image_integrated_gradients(model: torch.nn.Module, batch: dict, grid: tuple[int, int] | None,
                               target: int | None, options: ExplainOptions) -> ImageAttribution:
    """Captum ``IntegratedGradients`` over the model's input pixels (after resize/crop and normalisation), from
    the neutral image (:func:`neutral_image`) to the image; summed over colour channels, and over the cells of
    the region grid."""
    from captum.attr import IntegratedGradients

    pixels = batch["pixel_values"]
    forward, others = _forward_fn(model, batch, "pixel_values", target)
    with torch.enable_grad():
        attr, delta = IntegratedGradients(forward).attribute(
            pixels, baselines=neutral_image(pixels, options), additional_forward_args=others,
            n_steps=options.ig_steps, internal_batch_size=options.ig_batch, return_convergence_delta=True)
    pixel_map = attr[0].sum(0).detach().float().cpu().numpy()
    return ImageAttribution(
        method="Integrated Gradients (Captum IntegratedGradients over the input pixels)",
        baseline=describe_image_baseline(options), steps=options.ig_steps, pixel_map=pixel_map,
        region_map=sum_over_cells(pixel_map, grid or (1, 1)), delta=float(delta.reshape(-1)[0]))


NO_TAGS = "no tags: every tag slot padding, masked as the model masks padding"


@contextlib.contextmanager
def _layer_output(layer: torch.nn.Module, value: torch.Tensor | None = None) -> Iterator[list[torch.Tensor]]:
    """Within: ``layer``'s output replaced by ``value`` (when given); yields the outputs it gave."""
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        seen.append(output)
        return value

    handle = layer.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def tag_integrated_gradients(model: torch.nn.Module, batch: dict, slots: Sequence[int], tags: Sequence[str],
                             target: int | None, options: ExplainOptions) -> TagAttribution:
    """Captum ``IntegratedGradients`` over the post's tag embeddings (the output of ``model.tag_states_layer()``,
    (max_tags, width), before anything mixes the tags), from all-zero embeddings (what a padding slot embeds to)
    with the tag mask kept; summed over the width: one attribution per tag (``slots``: the post's tags' slots)."""
    from captum.attr import IntegratedGradients

    layer = model.tag_states_layer()
    with _layer_output(layer) as seen:
        run(model, batch)
    states = seen[0].detach()
    keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]

    def forward(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        b = {"ids": [BATCH_ID] * x.shape[0], **dict(zip(keys, others, strict=True))}
        with _layer_output(layer, x):
            return output_of(model(b)["logits"], target)

    with torch.enable_grad():
        attr, delta = IntegratedGradients(forward).attribute(
            states, baselines=torch.zeros_like(states), additional_forward_args=tuple(batch[k] for k in keys),
            n_steps=options.ig_steps, internal_batch_size=options.ig_batch, return_convergence_delta=True)
    per_slot = attr[0].sum(-1).detach().float().cpu().numpy()
    return TagAttribution(
        method="Integrated Gradients (Captum IntegratedGradients over the tags' embeddings, summed per tag)",
        baseline="every tag's embedding zero (as a padding slot's), the tag mask kept",
        steps=options.ig_steps, tags=list(tags), tag_scores=per_slot[list(slots)], delta=float(delta.reshape(-1)[0]))


def sum_over_cells(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W) → (rows, cols): the sum over each cell of an equal partition (rows of pixel r go to cell r·rows // H)."""
    h, w = values.shape
    rows, cols = grid
    out = np.zeros(grid, dtype=np.float64)
    r = (np.arange(h) * rows) // h
    c = (np.arange(w) * cols) // w
    np.add.at(out, (r[:, None], c[None, :]), values)
    return out


def image_grid(model: torch.nn.Module, batch: dict) -> tuple[int, int] | None:
    """(rows, cols) of the model's image regions, as its encoder reports them."""
    enc = getattr(model, "image_encoder", None)
    if enc is None or "pixel_values" not in batch:
        return None
    grid = getattr(enc, "grid_size", None)  # INFIG's image transformer knows it from its build
    if grid is None:
        grid = run(enc, batch["pixel_values"]).grid_size
    return tuple(int(g) for g in grid)
