"""The data doctor: what ``mmsenti data check`` and ``mmsenti data stats`` report.

:func:`check` loads a dataset leniently (duplicate ids, missing images and suspect labels are kept, not raised) and
reports counts per split and label, missing / unreadable / truncated / too large images (``decode_images``:
every pixel decoded, with a progress bar), labels read off the data that look like typos, empty texts, posts without
tags (in data that has tags), unlabelled samples, duplicate ids within a split and ids shared between splits.
:func:`stats` describes text lengths, tags per post, label balance and feature sequence lengths. :func:`format_report` renders either as plain text.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from PIL import Image

from mmsenti.config import DataConfig
from mmsenti.data.base import DatasetBundle, Sample
from mmsenti.data.formats.bundle import duplicate_ids
from mmsenti.data.formats.images import IMAGE_PROBLEMS, check_images, set_max_image_pixels
from mmsenti.data.formats.labels import label_problems

_SHOW = 5  # ids shown per problem


def load_bundle(data: DatasetBundle | DataConfig) -> DatasetBundle:
    """A bundle as is, or the dataset a config names, loaded leniently so every problem can be reported."""
    if isinstance(data, DatasetBundle):
        return data
    from mmsenti.registry import DATASETS

    return DATASETS.get(data.name).builder(data, lenient=True)


def _label_counts(bundle: DatasetBundle, samples: list[Sample]) -> dict[str, int]:
    """Count per label name, in label order (every class listed, zeros included)."""
    counts = Counter(s.label for s in samples if s.label is not None)
    names = bundle.label_names or []
    out = {n: counts.pop(i, 0) for i, n in enumerate(names)}
    out.update((str(k), counts[k]) for k in sorted(counts, key=repr))  # labels outside label_names, if any
    return out


# ------------------------------------------------------------------------------------------------ check
@dataclass
class SplitCheck:
    size: int
    labels: dict[str, int]  # classification: count per label name, in label order; regression: empty
    empty_texts: list[str] = field(default_factory=list)  # ids
    unlabelled: list[str] = field(default_factory=list)
    images: dict[str, list[str]] = field(default_factory=dict)  # problem → ids
    blank_images: int = 0  # samples already given a blank image (missing_images: blank)
    no_tags: list[str] = field(default_factory=list)  # ids of posts without tags, in data that has tags


@dataclass
class Report:
    """What :func:`check` found. ``has_errors`` is what makes ``mmsenti data check`` exit non-zero."""

    dataset: str
    task: str
    label_names: list[str] | None
    modalities: tuple[str, ...]
    splits: dict[str, SplitCheck]
    duplicate_ids: dict[str, list[str]]  # split → ids seen more than once in it
    shared_ids: dict[str, list[str]]  # "train/test" → ids in both splits
    images_checked: int = 0
    decoded: bool = False
    label_problems: list[str] = field(default_factory=list)  # classes read off the data that look like typos

    def errors(self) -> list[str]:
        out = [f"label {p} (set data.label_names if it is a real class)" for p in self.label_problems]
        for split, c in self.splits.items():
            for problem, ids in c.images.items():
                if ids:
                    limit = f", over {Image.MAX_IMAGE_PIXELS} pixels (data.max_image_pixels)" \
                        if problem == "too large" else ""
                    out.append(f"{split}: {len(ids)} {problem} image(s) (first: {', '.join(ids[:_SHOW])}{limit})")
            if c.unlabelled:
                out.append(f"{split}: {len(c.unlabelled)} unlabelled sample(s) (first: "
                           f"{', '.join(c.unlabelled[:_SHOW])})")
        for split, ids in self.duplicate_ids.items():
            out.append(f"{split}: {len(ids)} duplicate id(s) (first: {', '.join(ids[:_SHOW])})")
        for pair, ids in self.shared_ids.items():
            if "train" in pair and "test" in pair:
                out.append(f"{pair}: {len(ids)} id(s) in both (test leak; first: {', '.join(ids[:_SHOW])})")
        return out

    def warnings(self) -> list[str]:
        out = []
        for split, c in self.splits.items():
            if c.empty_texts:
                out.append(f"{split}: {len(c.empty_texts)} empty text(s) (first: {', '.join(c.empty_texts[:_SHOW])})")
            if c.blank_images:
                out.append(f"{split}: {c.blank_images} sample(s) use a blank image (missing_images: blank)")
            if c.no_tags:
                out.append(f"{split}: {len(c.no_tags)} post(s) without tags (a tags model reads none for them; "
                           f"first: {', '.join(c.no_tags[:_SHOW])})")
        for pair, ids in self.shared_ids.items():
            if not ("train" in pair and "test" in pair):
                out.append(f"{pair}: {len(ids)} id(s) in both (first: {', '.join(ids[:_SHOW])})")
        return out

    @property
    def has_errors(self) -> bool:
        return bool(self.errors())


def _image_problems(samples: list[Sample], decode: bool, workers: int, desc: str
                    ) -> tuple[dict[str, list[str]], int, int]:
    """``(problem → ids, files checked, blank count)``."""
    problems: dict[str, list[str]] = {}
    for s, problem, _ in check_images(samples, decode=decode, workers=workers, progress=decode, desc=desc):
        problems.setdefault(problem, []).append(s.id)
    files = sum(isinstance(s.image, (str, Path)) and not s.extra.get("image_missing") for s in samples)
    blank = sum(bool(s.extra.get("image_missing")) for s in samples)
    return {p: problems[p] for p in IMAGE_PROBLEMS if p in problems}, files, blank


def check(data: DatasetBundle | DataConfig, *, images: bool = True, decode_images: bool = False,
          workers: int = 8) -> Report:
    """Check a dataset (a bundle, or a config to load leniently).

    Args:
        data: the bundle or the dataset's config.
        images: check the image files (when the data has images).
        decode_images: decode every image fully instead of the fast check (header, size, end marker, PNG CRCs).
        workers: threads reading image files.
    """
    if isinstance(data, DataConfig):
        set_max_image_pixels(data.max_image_pixels)
    bundle = load_bundle(data)
    splits: dict[str, SplitCheck] = {}
    checked = 0
    for split, samples in bundle.splits.items():
        labels = _label_counts(bundle, samples) if bundle.task == "classification" else {}
        c = SplitCheck(size=len(samples), labels=labels,
                       empty_texts=[s.id for s in samples if s.text is not None and not s.text.strip()],
                       unlabelled=[s.id for s in samples if s.label is None],
                       no_tags=[s.id for s in samples if not s.tags] if "tags" in bundle.modalities else [])
        if images and "image" in bundle.modalities:
            c.images, n, c.blank_images = _image_problems(samples, decode_images, workers,
                                                          f"{split}: {'decoding' if decode_images else 'checking'}")
            checked += n
        splits[split] = c
    dups = {k: duplicate_ids(v) for k, v in bundle.splits.items()}
    ids = {k: {s.id for s in v} for k, v in bundle.splits.items()}
    shared = {f"{a}/{b}": sorted(ids[a] & ids[b]) for a, b in combinations(bundle.splits, 2)}
    return Report(dataset=bundle.name, task=bundle.task, label_names=bundle.label_names,
                  modalities=bundle.modalities, splits=splits,
                  duplicate_ids={k: v for k, v in dups.items() if v},
                  shared_ids={k: v for k, v in shared.items() if v}, images_checked=checked,
                  decoded=decode_images,
                  label_problems=label_problems(bundle.splits, bundle.label_names or [])
                  if bundle.inferred_labels else [])


# ------------------------------------------------------------------------------------------------ stats
def describe(values: list[float]) -> dict[str, float]:
    """min / mean / median / p90 / p95 / max (nearest-rank percentiles) of a list; empty → {}."""
    if not values:
        return {}
    v = sorted(values)

    def pct(q: float) -> float:
        return float(v[max(0, math.ceil(q * len(v)) - 1)])

    return {"min": float(v[0]), "mean": float(statistics.fmean(v)), "median": float(statistics.median(v)),
            "p90": pct(0.90), "p95": pct(0.95), "max": float(v[-1])}


@dataclass
class SplitStats:
    size: int
    labels: dict[str, int]  # classification: count per label name
    majority: float | None  # share of the most frequent class (the accuracy of always predicting it)
    scores: dict[str, float]  # regression: describe() of the labels plus std and the non-negative share
    text_words: dict[str, float]  # describe() of whitespace-token counts
    text_chars: dict[str, float]
    sequences: dict[str, dict[str, float]]  # modality → describe() of sequence lengths, plus "dim"
    tags: dict[str, float] = field(default_factory=dict)  # describe() of tags per post (data with tags)


@dataclass
class Stats:
    dataset: str
    task: str
    label_names: list[str] | None
    modalities: tuple[str, ...]
    splits: dict[str, SplitStats]
    has_errors: bool = False  # the CLI asks every report this


def stats(data: DatasetBundle | DataConfig) -> Stats:
    """Text length distribution, label balance and feature sequence lengths per split."""
    bundle = load_bundle(data)
    out: dict[str, SplitStats] = {}
    for split, samples in bundle.splits.items():
        labels: dict[str, int] = {}
        majority = None
        scores: dict[str, float] = {}
        labelled = [s.label for s in samples if s.label is not None]
        if bundle.task == "classification":
            labels = _label_counts(bundle, samples)
            majority = max(labels.values()) / len(labelled) if labelled else None
        elif labelled:
            y = [float(v) for v in labelled]
            scores = describe(y) | {"std": statistics.pstdev(y), "non_negative": sum(v >= 0 for v in y) / len(y)}
        texts = [s.text for s in samples if s.text is not None]
        seq: dict[str, dict[str, float]] = {}
        for mod in sorted({m for s in samples for m in (s.features or {})}):
            arrs = [s.features[mod] for s in samples if s.features and mod in s.features]
            seq[mod] = describe([a.shape[0] for a in arrs]) | {"dim": float(arrs[0].shape[-1])}
        out[split] = SplitStats(size=len(samples), labels=labels, majority=majority, scores=scores,
                                text_words=describe([len(t.split()) for t in texts]),
                                text_chars=describe([len(t) for t in texts]), sequences=seq,
                                tags=describe([len(s.tags or ()) for s in samples])
                                if "tags" in bundle.modalities else {})
    return Stats(dataset=bundle.name, task=bundle.task, label_names=bundle.label_names,
                 modalities=bundle.modalities, splits=out)


# ------------------------------------------------------------------------------------------------ format
def _fmt_desc(d: dict[str, float]) -> str:
    if not d:
        return "-"
    return (f"min {d['min']:g}  mean {d['mean']:.4g}  median {d['median']:g}  p90 {d['p90']:g}  "
            f"p95 {d['p95']:g}  max {d['max']:g}")


def _label_table(splits: dict[str, Any], names: list[str]) -> list[str]:
    width = max([len(n) for n in names] + [5])
    lines = [f"  {'label':<{width}}" + "".join(f"{k:>10}" for k in splits)]
    for n in names:
        lines.append(f"  {n:<{width}}" + "".join(f"{s.labels.get(n, 0):>10}" for s in splits.values()))
    lines.append(f"  {'total':<{width}}" + "".join(f"{s.size:>10}" for s in splits.values()))
    return lines


def format_report(report: Report | Stats) -> str:
    """Plain-text rendering of a :class:`Report` or :class:`Stats`."""
    head = [f"dataset {report.dataset}: {report.task}, modalities {', '.join(report.modalities)}"]
    names = list(report.label_names or sorted({k for s in report.splits.values() for k in s.labels}))
    if isinstance(report, Stats):
        lines = head
        if names:
            lines += _label_table(report.splits, names)
            lines.append("  majority share " + "  ".join(
                f"{k} {s.majority:.3f}" for k, s in report.splits.items() if s.majority is not None))
        for k, s in report.splits.items():
            lines.append(f"{k} ({s.size}):")
            if s.scores:
                lines.append(f"  score      {_fmt_desc(s.scores)}  std {s.scores['std']:.3f}  "
                             f"non-negative {s.scores['non_negative']:.3f}")
            lines.append(f"  text words {_fmt_desc(s.text_words)}")
            lines.append(f"  text chars {_fmt_desc(s.text_chars)}")
            if s.tags:
                lines.append(f"  tags/post  {_fmt_desc(s.tags)}")
            for mod, d in s.sequences.items():
                lines.append(f"  {mod} frames {_fmt_desc(d)}  dim {d['dim']:g}")
        return "\n".join(lines)
    lines = head
    if names:
        lines += _label_table(report.splits, names)
    else:
        lines.append("  " + ", ".join(f"{k} {s.size}" for k, s in report.splits.items()))
    if "image" in report.modalities:
        how = "decoded" if report.decoded else "header, size, end marker, PNG checksums"
        lines.append(f"images: {report.images_checked} file(s) checked ({how})")
    errors, warnings = report.errors(), report.warnings()
    lines += [f"ERROR   {e}" for e in errors] + [f"warning {w}" for w in warnings]
    lines.append("OK: no problems found" if not errors and not warnings else
                 f"{len(errors)} error(s), {len(warnings)} warning(s)")
    return "\n".join(lines)
