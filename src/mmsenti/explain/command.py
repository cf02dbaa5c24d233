"""``mmsenti explain RUN``: explain one prediction, write ``explanation.json`` and figures (the parser imports no
torch)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmsenti.explain.options import IMAGE_BASELINES, SOURCES, ExplainOptions

log = logging.getLogger(__name__)

DEFAULT_SOURCES = ExplainOptions().sources


def add_explain_parser(sub) -> argparse.ArgumentParser:
    d = ExplainOptions()
    s = sub.add_parser(
        "explain", help="explain one prediction: heat maps, attributions, neighbours",
        description="Explain a trained model's prediction for one post: modality attribution and Integrated Gradients "
                    "(every model), word → region heat maps and attention-pooling importance (infig; word → tag "
                    "maps when the image is read as tags), retrieved neighbours (rahp). Writes OUT/explanation.json "
                    "and PNG figures; see docs/explain.md.")
    s.add_argument("run_dir")
    s.add_argument("--text")
    s.add_argument("--image", help="image file")
    s.add_argument("--video", help="a clip (a model trained on `mmsenti features extract` output)")
    s.add_argument("--tags", help="the post's tags, comma-separated (a model that reads the image as tags: "
                                  "model.image_encoder.name=tags)")
    s.add_argument("--sample", metavar="SPLIT:INDEX",
                   help="explain a post of the model's own dataset instead, e.g. test:3 (built-in data needs no files)")
    s.add_argument("--root", help="dataset directory (for --sample, --neighbour-texts), if it moved since training")
    s.add_argument("--out", required=True, help="directory for explanation.json and the figures")
    s.add_argument("--words", type=int, default=d.words,
                   help=f"words drawn in the word → region figure: those with the highest pooling weight "
                        f"(default {d.words})")
    s.add_argument("--word", action="append", metavar="WORD", help="draw this word instead (repeatable)")
    s.add_argument("--source", action="append", choices=SOURCES,
                   help=f"rows of the word → region figure (repeatable; default {' and '.join(d.sources)})")
    s.add_argument("--layer", type=int, default=d.hfam_layer,
                   help="HFAM layer of the similarity map, from the end (1 = last)")
    s.add_argument("--ig-steps", type=int, default=d.ig_steps, help="Integrated Gradients steps")
    s.add_argument("--no-ig", action="store_true", help="skip Integrated Gradients (the slowest part)")
    s.add_argument("--image-baseline", choices=IMAGE_BASELINES, default=d.image_baseline,
                   help="neutral image for replacement and IG: the mean colour, or the image blurred")
    s.add_argument("--neighbour-texts", action="store_true",
                   help="rahp: list the neighbours' texts (loads the training data from the model's config)")
    s.add_argument("--device", default="auto")
    return s


def run(args: argparse.Namespace, load_model: Callable[..., Any]) -> int:
    """``mmsenti explain``; ``load_model`` is :func:`mmsenti.inference.load_model`, handed down by the CLI (the
    predictor calls this package, so this package never calls up to it)."""
    from mmsenti.data.base import DataError, Sample
    from mmsenti.explain.core import explain
    from mmsenti.models.base import check_per_post

    try:
        options = ExplainOptions(words=args.words, select=tuple(args.word) if args.word else None,
                                 sources=tuple(args.source) if args.source else DEFAULT_SOURCES,
                                 hfam_layer=args.layer, integrated_gradients=not args.no_ig, ig_steps=args.ig_steps,
                                 image_baseline=args.image_baseline)
    except ValueError as e:
        raise DataError(str(e)) from None
    given = [x for x in (args.text, args.image, args.tags, args.video) if x is not None]
    if args.sample and given:
        raise DataError("give --sample SPLIT:INDEX or --text/--image/--tags/--video, not both")
    if not args.sample and not given:
        raise DataError("give --text and/or --image, --tags or --video (or --sample SPLIT:INDEX)")
    predictor = load_model(args.run_dir, args.device)
    check_per_post(predictor.config.model, "explained")  # before reading any post
    bundle = None
    if args.sample:
        bundle = _dataset(predictor, args.root)
        sample = _pick(bundle, args.sample)
    else:
        tags = [t.strip() for t in args.tags.split(",") if t.strip()] if args.tags is not None else None
        sample = Sample(id="cli", label=None, text=args.text, image=args.image, tags=tags, video=args.video)
        if "video" in predictor.processor.post_fields.values():
            if args.video is None:
                raise DataError("this model reads clips: give --video PATH")
            sample = predictor.processor.prepare(sample)  # the clip's features, extracted with the model's settings
    # What the model reads of a post: its text, its image, or the image's tags (model.image_encoder.name=tags).
    reads = predictor.config.model.data_modalities()
    for m, value, flag in (("image", sample.image, "--image PATH"), ("tags", sample.tags, "--tags A,B,C"),
                           ("text", sample.text, "--text T")):
        if m in reads and value is None and not predictor.allow_missing_modality:
            raise DataError(f"this model reads {'the image as tags' if m == 'tags' else m}: give {flag}")
    if sample.image is not None and "image" in reads:
        sample = _checked_image(sample)
    neighbours = None
    if args.neighbour_texts and getattr(predictor.model, "lists_neighbours", False):
        bundle = bundle or _dataset(predictor, args.root)
        neighbours = {s.id: s for s in bundle.split("train")}
    try:
        ex = explain(predictor, sample, options, neighbours)
    except ValueError as e:  # e.g. --layer beyond the model's HFAM layers
        raise DataError(str(e)) from None
    written = write_explanation(ex, sample.image, Path(args.out), options.sources)
    print(summary(ex))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def write_explanation(ex, image, out: Path, sources: tuple[str, ...] = DEFAULT_SOURCES) -> list[Path]:
    """``explanation.json``, the figures as PNG and (RAHP) ``neighbours.md`` in ``out``; returns the paths."""
    from mmsenti.explain.figures import figures_for, save_png

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "explanation.json"]
    paths[0].write_text(json.dumps(ex.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, fig in figures_for(ex, image, sources).items():
        save_png(fig, out / f"{name}.png")
        paths.append(out / f"{name}.png")
    if ex.neighbours:
        (out / "neighbours.md").write_text(ex.neighbours_table() + "\n", encoding="utf-8")
        paths.append(out / "neighbours.md")
    return paths


def summary(ex) -> str:
    """A few readable lines: the prediction, what each modality adds, the words that matter, the neighbours."""
    p = ex.prediction
    lines = [f"prediction: {p['label']} ({p['probabilities'][p['label']]:.3f})" if "label" in p
             else f"prediction: score {p['score']:.4f}"]
    if ex.modality is not None:
        what = f"p({ex.modality.target})" if ex.modality.target is not None else "the score"
        parts = []
        for m, v in ex.modality.effects.items():
            flip = " (label changes without it)" if ex.modality.changes_prediction.get(m) else ""
            parts.append(f"{m} {v:+.3f}{flip}")
        lines.append(f"modalities (change of {what} when replaced): " + ", ".join(parts))
    words = ex.word_texts
    if ex.word_importance is not None:
        top = sorted(range(len(words)), key=lambda i: -ex.word_importance[i])[:6]
        lines.append("attention pooling, top words: "
                     + ", ".join(f"{words[i]} {ex.word_importance[i]:.3f}" for i in top))
    if ex.text_attribution is not None:
        s = ex.text_attribution.word_scores
        top = sorted(range(len(words)), key=lambda i: -abs(s[i]))[:6]
        lines.append("Integrated Gradients, top words: " + ", ".join(f"{words[i]} {s[i]:+.4f}" for i in top))
    if ex.tag_attribution is not None:
        ta = ex.tag_attribution
        lines.append("Integrated Gradients, tags: " + ", ".join(f"{t} {v:+.4f}" for t, v in zip(ta.tags, ta.tag_scores,
                                                                                               strict=True)))
    if ex.neighbours:
        lines += ["retrieved neighbours:", ex.neighbours_table()]
    lines += [f"note: {n}" for n in ex.notes]
    return "\n".join(lines)


def _checked_image(sample):
    """The sample with its image read, refused (one line) when it is too thin or too small to explain: the
    service's limits (:func:`mmsenti.data.base.image_shape_problem`)."""
    import dataclasses

    from mmsenti.data.base import DataError, image_shape_problem
    from mmsenti.data.processing import open_image

    image = open_image(sample.image, sample.id)
    problem = image_shape_problem(*image.size)
    if problem:
        where = f"--image {sample.image}" if isinstance(sample.image, str | Path) else f"post {sample.id}"
        raise DataError(f"{where}: {problem}")
    return dataclasses.replace(sample, image=image)


def _dataset(predictor, root: str | None):
    import copy

    from mmsenti.train.workbench import build_dataset

    cfg = copy.deepcopy(predictor.config)
    if root:
        cfg.data.root = root
    return build_dataset(cfg)


def _pick(bundle, spec: str):
    from mmsenti.data.base import DataError

    split, _, index = spec.partition(":")
    if not index.isdigit():
        raise DataError(f"--sample: expected SPLIT:INDEX (e.g. test:3), got {spec!r}")
    samples = bundle.split(split)
    if int(index) >= len(samples):
        raise DataError(f"--sample: the {split} split has {len(samples)} posts, no index {index}")
    return samples[int(index)]
