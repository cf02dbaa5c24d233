"""Parity of an exported graph with the PyTorch model it came from.

The inputs are the run's dev split when its data can be loaded (real posts, in batches of the export's batch
size), followed by a few generated batches whose shapes probe the dynamic axes (batch 1, 2 and 7; sequence lengths
from 2 up to the preprocessing's maximum; uneven padding; for feature sequences also empty ones; for models that can
hide a modality, posts without one). Both models see exactly the same tensors. The figures:

* ``max_abs_diff``: the largest |Δ| of any logit (or score) of any post;
* ``agreement``: the fraction of posts with the same predicted label (regression: the same sign, as Acc-2);
* for a model with other outputs (RAHP with a memory bank: ``neighbours``), ``<name>_agreement``: the fraction
  of their values that are the same (retrieved bank rows);
* with labels (the dev split) the selection metric of both (``metric``), e.g. the int8 model's change in weighted F1.

Everything is rebuilt from a *recipe* stored in ``export.json``, so ``mmsenti export --check`` recomputes the same
figures later.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmsenti.export.format import PRESENT_KEYS, ExportError, ParityError, TensorSpec

log = logging.getLogger(__name__)

PROBE_SHAPES = ((1, 2), (2, 5), (7, None))  # (batch, sequence length; None = the longest the model reads)


@dataclass
class ParityInputs:
    batches: list[dict[str, Any]]  # model inputs (torch tensors), dev batches first
    labels: np.ndarray | None  # the dev posts' labels, in order (they are the first rows), or None
    recipe: dict[str, Any]  # how to build the same inputs again (stored in export.json)
    description: str
    dev_posts: int = 0
    generated_posts: int = field(default=0)
    warnings: list[str] = field(default_factory=list)  # why the dev split was not used (shown and in export.json)

    @property
    def posts(self) -> int:
        return self.dev_posts + self.generated_posts


# ----------------------------------------------------------------------------------------------------- inputs
def build_inputs(model, processor, config, specs: list[TensorSpec], *, posts: int = 512, batch_size: int = 16,
                 seed: int = 0, root: str | None = None, use_dev: bool = True, require_dev: bool = False
                 ) -> ParityInputs:
    """The dev split (up to ``posts`` posts, when its data can be loaded) + generated shape probes.

    Args:
        root: the dataset directory, if it moved since training.
        use_dev: read the dev split at all (False: generated inputs only).
        require_dev: a dev split that cannot be loaded is an error instead of a fallback (``--check`` of an export
            whose figures came from the dev split).
    """
    batches: list[dict[str, Any]] = []
    labels = None
    recipe: dict[str, Any] = {"dev": None, "generated": {"seed": seed, "shapes": [list(s) for s in PROBE_SHAPES]}}
    dev_text = "no dev split"
    n_dev = 0
    warnings: list[str] = []
    if use_dev:
        try:
            samples, dataset = _dev_samples(config, root)
        except Exception as e:  # noqa: BLE001 - any failure to load the data means: parity on generated inputs
            if require_dev:
                raise ExportError(f"the dev split the figures were computed on cannot be loaded ({e}); "
                                  "give its directory with --root") from None
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            # Not silent: without the dev split there is no check on real posts and no dev-metric figure.
            warnings.append(f"the dev split could not be loaded ({reason[:300]}): parity was checked on generated "
                            "inputs only, with no dev-metric figure; give the data's directory with --root DIR")
            log.warning("parity: %s", warnings[-1])
            dev_text = f"dev split not available ({reason[:120]})"
        else:
            samples = samples[:posts]
            n_dev = len(samples)
            batches += [processor(samples[i:i + batch_size], training=False) for i in range(0, n_dev, batch_size)]
            if all(s.label is not None for s in samples) and samples:
                labels = np.asarray([s.label for s in samples])
            recipe["dev"] = {"dataset": dataset, "posts": n_dev, "batch_size": batch_size}
            dev_text = f"{n_dev} posts of the {dataset} dev split in batches of {batch_size}"
    probes = generated_batches(model, processor, specs, seed)
    n_gen = sum(_batch_size(b) for b in probes)
    sizes = ", ".join(str(_batch_size(b)) for b in probes)
    return ParityInputs(batches + probes, labels, recipe, f"{dev_text} + {n_gen} generated posts (batches of {sizes})",
                        n_dev, n_gen, warnings)


def _dev_samples(config, root: str | None):
    from mmsenti.train.workbench import build_dataset

    cfg = copy.deepcopy(config)
    if root:
        cfg.data.root = root
    bundle = build_dataset(cfg)
    samples = bundle.split("dev")
    if not samples:
        raise ExportError(f"dataset '{bundle.name}' has an empty dev split")
    return samples, bundle.name


def _batch_size(batch: dict[str, Any]) -> int:
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))


def generated_batches(model, processor, specs: list[TensorSpec], seed: int = 0,
                      shapes=PROBE_SHAPES) -> list[dict[str, Any]]:
    """Random inputs of ``shapes`` ((batch, sequence length) pairs), each input builder's own (valid token ids with
    uneven padding, random pixels, features with some sequences empty, ...), and for models that can hide a modality
    some posts without one."""
    g = torch.Generator().manual_seed(seed)
    names = {s.name for s in specs}
    # Builder by builder in a fixed order, so the same seed gives the same inputs (`export --check`).
    builders = sorted((b for b in processor.active(training=False) if set(b.keys()) <= names),
                      key=lambda b: b.draw_order)
    out = []
    for b, length in shapes:
        batch: dict[str, Any] = {"ids": [f"generated-{b}-{i}" for i in range(b)]}
        for builder in builders:
            batch.update(builder.example(b, length, g))
        if PRESENT_KEYS[0] in names:
            image = torch.rand(b, generator=g) < 0.7
            text = ~image | (torch.rand(b, generator=g) < 0.7)  # never both missing
            image[0] = text[0] = True
            batch.update(zip(PRESENT_KEYS, (image, text), strict=True))
        out.append(batch)
    return out


# ----------------------------------------------------------------------------------------------------- running
def torch_outputs(model, inputs: ParityInputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits of every post, the model's other export outputs, e.g. RAHP's retrieved bank rows) of the eager
    model."""
    logits, extras = [], {}
    with torch.inference_mode():
        for batch in inputs.batches:
            logits.append(model(batch)["logits"].float().numpy())
            for name, value in model.export_reference(batch).items():
                extras.setdefault(name, []).append(value.numpy())
    return np.concatenate(logits), {name: np.concatenate(v) for name, v in extras.items()}


def onnx_outputs(backend, inputs: ParityInputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    logits, extras = [], {}
    names = ["logits", *(n for n in backend.output_names if n != "logits")]
    for batch in inputs.batches:
        try:
            out = backend.run_outputs(batch, names)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types: a graph that breaks on these shapes
            shapes = ", ".join(f"{k} {tuple(batch[k].shape)}" for k, _ in backend.inputs if k in batch)
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ParityError(f"onnxruntime cannot run the exported graph on inputs {shapes}: {first[:300]}") from None
        logits.append(out[0])
        for name, value in zip(names[1:], out[1:], strict=True):
            extras.setdefault(name, []).append(value)
    return np.concatenate(logits), {name: np.concatenate(v) for name, v in extras.items()}


# ----------------------------------------------------------------------------------------------------- figures
def predictions(task: str, logits: np.ndarray) -> np.ndarray:
    """Predicted class, or the sign class of a regression score (Acc-2: non-negative vs negative)."""
    return logits.argmax(-1) if task == "classification" else (logits[:, 0] >= 0).astype(np.int64)


def compare(task: str, reference: np.ndarray, exported: np.ndarray, *, labels: np.ndarray | None = None,
            metric: str | None = None, label_names=None, extras_ref: dict[str, np.ndarray] | None = None,
            extras_exported: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The parity figures of ``exported`` against ``reference`` (see the module docstring); ``extras_*``: the
    model's other outputs (e.g. ``neighbours``), each compared exactly (``<name>_agreement``)."""
    diff = np.abs(exported.astype(np.float64) - reference.astype(np.float64))
    out: dict[str, Any] = {"posts": int(len(reference)), "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                           "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
                           "agreement": float((predictions(task, exported) == predictions(task, reference)).mean())}
    for name, want in (extras_ref or {}).items():
        if name in (extras_exported or {}):
            out[f"{name}_agreement"] = float((want == extras_exported[name]).mean())
    if labels is not None and metric:
        from mmsenti.metrics import compute_metrics

        n = len(labels)
        ref_m = compute_metrics(task, labels, _scores(task, reference[:n]), label_names)
        exp_m = compute_metrics(task, labels, _scores(task, exported[:n]), label_names)
        out["metric"] = {"name": metric, "split": "dev", "posts": n, "reference": float(ref_m[metric]),
                         "exported": float(exp_m[metric]), "delta": float(exp_m[metric] - ref_m[metric])}
    return out


def _scores(task: str, logits: np.ndarray) -> np.ndarray:
    return logits if task == "classification" else logits[:, 0]


def _extra_agreements(figures: dict[str, Any]) -> dict[str, float]:
    """``{output name: agreement}`` of the model's other outputs (e.g. RAHP's retrieved neighbours)."""
    return {k[: -len("_agreement")]: v for k, v in figures.items() if k.endswith("_agreement") and k != "agreement"}


def passes(figures: dict[str, Any], tolerance: float) -> bool:
    """The fp32 rule: every logit within ``tolerance``, every prediction (and other output, e.g. every retrieved
    neighbour) the same."""
    return (figures["max_abs_diff"] <= tolerance and figures["agreement"] == 1.0
            and all(v == 1.0 for v in _extra_agreements(figures).values()))


def describe(figures: dict[str, Any]) -> str:
    text = (f"max |Δlogit| {figures['max_abs_diff']:.2e}, agreement {100 * figures['agreement']:.2f} % "
            f"over {figures['posts']} posts")
    for name, agreement in _extra_agreements(figures).items():
        text += f", {name} {100 * agreement:.2f} % the same"
    if "metric" in figures:
        m = figures["metric"]
        text += f"; dev {m['name']} {m['reference']:.4f} → {m['exported']:.4f} ({m['delta']:+.4f})"
    return text


# Figures recomputed by `--check` must equal the recorded ones: agreement and metrics exactly (they are counts),
# differences up to the run-to-run jitter of float sums (thread scheduling may reorder them).
_DIFF_SLACK = (1e-6, 0.05)  # absolute, relative


def mismatches(recorded: dict[str, Any], recomputed: dict[str, Any], prefix: str = "") -> list[str]:
    """Names (with both values) of the figures of ``recorded`` that ``recomputed`` does not reproduce."""
    bad = []
    for key, want in recorded.items():
        got = recomputed.get(key)
        name = f"{prefix}{key}"
        if isinstance(want, dict):
            bad += mismatches(want, got if isinstance(got, dict) else {}, f"{name}.")
        elif key in ("max_abs_diff", "mean_abs_diff"):
            if got is None or abs(got - want) > _DIFF_SLACK[0] + _DIFF_SLACK[1] * abs(want):
                bad.append(f"{name}: recorded {want:.3e}, recomputed {got if got is None else f'{got:.3e}'}")
        elif isinstance(want, float):
            if got is None or abs(got - want) > 1e-9:
                bad.append(f"{name}: recorded {want!r}, recomputed {got!r}")
        elif want != got:
            bad.append(f"{name}: recorded {want!r}, recomputed {got!r}")
    return bad
