"""The typed result of an explanation (numpy arrays; ``to_dict()`` gives JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DECIMALS = 6  # JSON floats are rounded: explanations are read by people and plots, not re-used as weights


@dataclass
class Word:
    """A word of the post: word pieces merged back, special tokens and padding never included.

    Attributes:
        text: the word as written in the post (``text[start:end]``).
        start, end: its character span in the post's text.
        tokens: its word pieces' positions in the model's input ids ([CLS] is position 0).
    """

    text: str
    start: int
    end: int
    tokens: list[int]


@dataclass
class RegionMaps:
    """One heat map over the image's region grid per word, from one source; for a model that reads the image as its
    tags, one row over the post's tags per word (a word × tag table).

    Attributes:
        source: ``similarity`` (HFAM token-wise cosine), ``attention`` (last fusion layer, mean over heads) or
            ``rollout`` (attention rollout across the fusion layers).
        label: what the values are, for figure titles and readers.
        maps: (n_words, rows, cols), rows/cols as the encoder's region grid; tags: (n_words, n_tags), the columns
            those of :attr:`Explanation.tags` (the post's tags the model read; padding slots never appear).
        image_share: attention sources: per word, the share of its attention on the image's regions or tags (the
            rest goes to text tokens and the image [CLS]); None for the similarity.
    """

    source: str
    label: str
    maps: np.ndarray
    image_share: np.ndarray | None = None


@dataclass
class ModalityAttribution:
    """How the output changes when a modality is replaced by a neutral input.

    Attributes:
        target: the label whose probability is compared (the predicted one), or None for a regression score.
        replaced_by: per modality, what stands in for it.
        outputs: per input variant (``full``, ``without_<m>``, ``without_all``), the decoded output.
        values: per variant, p(target) (classification) or the score.
        effects: per modality m, ``values[full] - values[without_m]`` (how much m adds); for two modalities also
            ``interaction`` = full − without_a − without_b + without_all (what only the pair gives). A modality the
            model does not read gets exactly 0.
        changes_prediction: per modality, whether replacing it changes the predicted label.
    """

    target: str | None
    replaced_by: dict[str, str]
    outputs: dict[str, dict]
    values: dict[str, float]
    effects: dict[str, float]
    changes_prediction: dict[str, bool]


@dataclass
class TextAttribution:
    """Integrated Gradients of the explained output w.r.t. the text's word embeddings.

    Attributes:
        word_scores: (n_words,) per word, the sum of its pieces' attributions (signed: positive = raises the output).
        token_scores: (n_tokens,) per input position (special tokens included: 0 by construction of the baseline).
        delta: Captum's convergence delta, sum(attributions) − (f(input) − f(baseline)): the error of the path
            integral (more ``ig_steps`` make it smaller).
    """

    method: str
    baseline: str
    steps: int
    word_scores: np.ndarray
    token_scores: np.ndarray
    delta: float


@dataclass
class ImageAttribution:
    """Integrated Gradients of the explained output w.r.t. the image's pixels (the model's input).

    Attributes:
        pixel_map: (size, size) per input pixel, summed over colour channels (not in the JSON: drawn only).
        region_map: (rows, cols) the pixel attributions summed over each cell of the region grid.
    """

    method: str
    baseline: str
    steps: int
    pixel_map: np.ndarray
    region_map: np.ndarray
    delta: float


@dataclass
class TagAttribution:
    """Integrated Gradients of the explained output w.r.t. the post's tags (a model that reads the image as tags).

    Attributes:
        tags: the tags the model read, as the post gives them (padding slots never appear).
        tag_scores: (n_tags,) per tag, the sum of its embedding's attributions (signed: positive = raises the output).
        delta: Captum's convergence delta (see :class:`TextAttribution`).
    """

    method: str
    baseline: str
    steps: int
    tags: list[str]
    tag_scores: np.ndarray
    delta: float


@dataclass
class Neighbour:
    """A training sample RAHP retrieved and put into a target modality's sample-level context.

    Attributes:
        target: the modality whose context it joined; source: the modality index it was found in.
        rank: 1 = most similar in that index; row: its memory-bank row; id: its sample id.
        similarity: cosine of the target's retrieval embedding with the neighbour's ``source`` embedding.
        label: its training label (name, or score) as stored in the bank or read from the dataset; None if neither.
        text: its text, when the training data was at hand.
    """

    target: str
    source: str
    rank: int
    row: int
    id: str
    similarity: float
    label: str | float | None = None
    text: str | None = None


@dataclass
class Explanation:
    """Everything computed about one prediction. Fields a model does not have are None (or empty)."""

    id: str
    model: str  # the registered model name
    modalities: list[str]
    prediction: dict  # {"label", "probabilities"} or {"score"}, as Predictor.predict returns it
    text: str | None = None
    words: list[Word] = field(default_factory=list)
    image_size: tuple[int, int] | None = None  # (width, height) of the image as given
    image_box: tuple[float, float, float, float] | None = None  # the part the model sees: (left, top, right, bottom)
    input_size: int | None = None  # side of the model's square input image
    grid: tuple[int, int] | None = None  # (rows, cols) of the region grid
    tags: list[str] | None = None  # a model that reads the image as tags: those of the post it read (maps' columns)
    region_maps: dict[str, RegionMaps] = field(default_factory=dict)  # INFIG, by source
    word_importance: np.ndarray | None = None  # INFIG: attention-pooling weight per word (eq. 9)
    region_importance: np.ndarray | None = None  # INFIG: attention-pooling weight per region, (rows, cols)
    tag_importance: np.ndarray | None = None  # INFIG on tags: attention-pooling weight per tag, (n_tags,)
    image_cls_importance: float | None = None  # INFIG: the pooling weight of the image [CLS]
    selected_words: list[int] = field(default_factory=list)  # indexes of the words the figure draws
    modality: ModalityAttribution | None = None
    text_attribution: TextAttribution | None = None
    image_attribution: ImageAttribution | None = None
    tag_attribution: TagAttribution | None = None
    neighbours: list[Neighbour] | None = None  # RAHP
    notes: list[str] = field(default_factory=list)  # what was skipped and why, caveats

    @property
    def word_texts(self) -> list[str]:
        return [w.text for w in self.words]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays as nested lists (floats rounded), the pixel-level IG map left out. A model that reads
        the image as tags has ``tags`` and its word → tag maps under ``word_tags`` (``word_regions`` is empty)."""
        maps = {s: {"label": m.label, "maps": _round(m.maps), "image_share": _round(m.image_share)}
                for s, m in self.region_maps.items()}
        ta = self.tag_attribution
        out: dict[str, Any] = {
            "id": self.id, "model": self.model, "modalities": self.modalities, "prediction": self.prediction,
            "text": self.text,
            "words": [{"text": w.text, "start": w.start, "end": w.end, "tokens": w.tokens} for w in self.words],
            "image": None if self.image_size is None else {
                "size": list(self.image_size), "box": _round(self.image_box), "input_size": self.input_size,
                "grid": list(self.grid) if self.grid else None},
            "tags": self.tags,
            "word_regions": maps if self.tags is None else {},
            "word_tags": maps if self.tags is not None else {},
            "word_importance": _round(self.word_importance),
            "region_importance": _round(self.region_importance),
            "tag_importance": _round(self.tag_importance),
            "image_cls_importance": _round(self.image_cls_importance),
            "selected_words": self.selected_words,
            "modality": None if self.modality is None else {
                "target": self.modality.target, "replaced_by": self.modality.replaced_by,
                "outputs": self.modality.outputs, "values": _round(self.modality.values),
                "effects": _round(self.modality.effects), "changes_prediction": self.modality.changes_prediction},
            "text_attribution": None if self.text_attribution is None else {
                "method": self.text_attribution.method, "baseline": self.text_attribution.baseline,
                "steps": self.text_attribution.steps, "word_scores": _round(self.text_attribution.word_scores),
                "token_scores": _round(self.text_attribution.token_scores),
                "delta": _round(self.text_attribution.delta)},
            "image_attribution": None if self.image_attribution is None else {
                "method": self.image_attribution.method, "baseline": self.image_attribution.baseline,
                "steps": self.image_attribution.steps, "region_map": _round(self.image_attribution.region_map),
                "delta": _round(self.image_attribution.delta)},
            "tag_attribution": None if ta is None else {
                "method": ta.method, "baseline": ta.baseline, "steps": ta.steps, "tags": ta.tags,
                "tag_scores": _round(ta.tag_scores), "delta": _round(ta.delta)},
            "neighbours": None if self.neighbours is None else [
                {**n.__dict__, "similarity": _round(n.similarity), "label": _round(n.label)} for n in self.neighbours],
            "notes": self.notes,
        }
        return out

    def neighbours_table(self) -> str:
        """The RAHP neighbours as a Markdown table (empty string when there are none)."""
        return neighbours_table(self.neighbours or [])


def neighbours_table(neighbours: list[Neighbour], max_text: int = 80) -> str:
    if not neighbours:
        return ""
    lines = ["| target | index | rank | id | similarity | label | text |", "|---|---|---|---|---|---|---|"]
    for n in neighbours:
        text = "" if n.text is None else n.text.replace("|", "\\|").replace("\n", " ")
        if len(text) > max_text:
            text = text[: max_text - 1] + "…"
        label = "" if n.label is None else (f"{n.label:.3f}" if isinstance(n.label, float) else str(n.label))
        lines.append(f"| {n.target} | {n.source} | {n.rank} | {n.id} | {n.similarity:.4f} | {label} | {text} |")
    return "\n".join(lines)


def _round(x: Any) -> Any:
    if x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    if isinstance(x, np.ndarray):
        return _round(x.astype(np.float64).tolist())
    if isinstance(x, (float, np.floating)):
        return round(float(x), DECIMALS) if np.isfinite(x) else None  # JSON has no NaN
    if isinstance(x, (int, np.integer)):
        return int(x)
    return x
