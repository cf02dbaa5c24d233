"""Figures of an explanation (matplotlib's object API on the Agg canvas: no pyplot, safe in servers and threads).

The drawing functions take arrays and return a ``Figure``; :func:`figures_for` draws an
:class:`~mmsenti.explain.results.Explanation`. Every panel is an axes labelled ``"panel"`` (colour bars are not),
and :func:`save_png` records the panel count in the PNG's text chunk ``mmsenti:panels``.

For a model that reads the image as a post's tags there is no image to draw on: its word → tag maps are tables
(words as rows, the post's tags as columns) and its per-tag values bars.

Heat maps over the region grid are drawn over the image *as it was given*, at its own aspect ratio: the grid covers
``box``, the part of the image the model saw (all of it for ``squash`` resizing, stretched; the centre square for
resize-shorter-side + crop, outlined).

Every figure's size is bounded whatever the image: a panel is at most :data:`MAX_PANEL_ASPECT` times taller than
wide (a taller image is drawn narrower inside it), no figure is larger than :data:`MAX_FIGURE_INCHES` on a side,
and the image is drawn from a copy of at most :data:`MAX_DRAWN_SIDE` pixels a side. (A 1x6000 image once sized a
figure 12,000 inches tall.)
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mmsenti.explain.results import Explanation
from mmsenti.plots import figure

PANEL = "panel"
HEAT_CMAP = "jet"
SIGNED_CMAP = "RdBu_r"
MAX_WORDS = 40  # words drawn in a bar chart (the JSON has them all)
MAX_PANEL_ASPECT = 3.0  # a panel's height / width at most
MAX_FIGURE_INCHES = 40.0  # either side of a figure (4,000 pixels at save_png's 100 dpi)
MAX_DRAWN_SIDE = 1024  # pixels of the post's image as drawn (a panel is about 200 pixels wide)


def new_figure(width: float, height: float):
    """A figure of ``width`` x ``height`` inches, scaled down (both sides alike) to fit :data:`MAX_FIGURE_INCHES`."""
    scale = min(1.0, MAX_FIGURE_INCHES / max(width, height))
    return figure(width * scale, height * scale)


def _panel(fig, grid, index) -> object:
    ax = fig.add_subplot(grid[index])
    ax.set_label(PANEL)
    return ax


def draw_image(ax, image: np.ndarray, title: str = "") -> None:
    h, w = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def draw_overlay(ax, image: np.ndarray, box: Sequence[float], heat: np.ndarray, title: str = "",
                 cmap: str = HEAT_CMAP, vmin: float | None = None, vmax: float | None = None, alpha: float = 0.55,
                 smooth: bool = True):
    """``heat`` (rows, cols), or a pixel map of the model's input, stretched over ``box`` of ``image``."""
    draw_image(ax, image, title)
    left, top, right, bottom = box
    im = ax.imshow(heat, extent=(left, right, bottom, top), cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha,
                   interpolation="bilinear" if smooth else "nearest")
    h, w = image.shape[:2]
    if (left, top, right, bottom) != (0, 0, w, h):  # a centre crop: show what the model saw
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, ls="--", lw=1, ec="white"))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return im


def word_region_figure(image: np.ndarray, box: Sequence[float], rows: Sequence[tuple[str, np.ndarray]],
                       words: Sequence[str], title: str = ""):
    """The image, then one heat map per word, one row per source (INFIG paper, Fig. 4).

    Args:
        rows: (source label, maps (n_words, grid rows, grid cols)); the colour scale is shared within a row, so
            words of one source compare.
        words: the words the maps belong to (titles).
    """
    n = len(words)
    if any(m.shape[0] != n for _, m in rows):
        raise ValueError("every row needs one map per word")
    ih, iw = image.shape[:2]
    panel_w = 2.0
    panel_h = panel_w * min(ih / iw, MAX_PANEL_ASPECT) + 0.45
    fig = new_figure(panel_w * (n + 1) + 0.6, panel_h * len(rows) + (0.4 if title else 0.1))
    grid = fig.add_gridspec(len(rows), n + 1)
    for r, (label, row_maps) in enumerate(rows):
        lo, hi = float(np.nanmin(row_maps)), float(np.nanmax(row_maps))
        ax = _panel(fig, grid, (r, 0))
        draw_image(ax, image)
        ax.set_title(_wrap(label, 28), fontsize=8)
        im = None
        for i, word in enumerate(words):
            ax = _panel(fig, grid, (r, i + 1))
            im = draw_overlay(ax, image, box, row_maps[i], f"“{word}”", vmin=lo, vmax=hi)
        if im is not None:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def word_tag_figure(rows: Sequence[tuple[str, np.ndarray]], words: Sequence[str], tags: Sequence[str],
                    title: str = ""):
    """Word → tag maps of a model that reads the image as tags: one heat map per source, words as rows and the
    post's tags as columns (the word → region maps' counterpart).

    Args:
        rows: (source label, maps (n_words, n_tags)); each panel has its own colour scale.
    """
    words = list(words)[:MAX_WORDS]
    if any(m.shape[1] != len(tags) for _, m in rows):
        raise ValueError("every map needs one column per tag")
    panel_w = max(3.0, 0.45 * len(tags) + 1.8)  # room for the word labels and the colour bar
    width = max(7.0 if title else 0.0, (panel_w + 0.6) * len(rows))  # and for the title
    fig = new_figure(width, 0.28 * len(words) + 1.8 + (0.5 if title else 0.0))
    grid = fig.add_gridspec(1, len(rows))
    for i, (label, maps) in enumerate(rows):
        ax = _panel(fig, grid, i)
        im = ax.imshow(maps[: len(words)], cmap=HEAT_CMAP, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(tags)), [_wrap(t, 14) for t in tags], fontsize=7, rotation=45, ha="right")
        ax.set_yticks(range(len(words)), words, fontsize=7)
        ax.set_title(_wrap(label, 40), fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def importance_figure(words: Sequence[str], word_weights: np.ndarray, image: np.ndarray | None,
                      box: Sequence[float] | None, region_weights: np.ndarray, cls_weight: float | None = None,
                      title: str = "", tags: Sequence[str] | None = None):
    """INFIG's attention-pooling weights (eqs. 8-9): a bar per word, a map over the regions (or, with ``tags``, a
    bar per tag: ``region_weights`` is then (n_tags,) and no image is drawn)."""
    fig = new_figure(9.0, 3.2)
    grid = fig.add_gridspec(1, 2, width_ratios=[1.6, 1])
    ax = _panel(fig, grid, 0)
    _word_bars(ax, words, word_weights, signed=False)
    ax.set_title("attention pooling weight per word", fontsize=9)
    ax = _panel(fig, grid, 1)
    extra = f" (image [CLS] {cls_weight:.3f})" if cls_weight is not None else ""
    if tags is not None:
        _word_bars(ax, tags, region_weights, signed=False)
        ax.set_title("per tag" + extra, fontsize=9)
    else:
        im = draw_overlay(ax, image, box, region_weights, "per region" + extra, smooth=False)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def attribution_figure(effects: Mapping[str, float], target: str | None, words: Sequence[str] | None = None,
                       word_scores: np.ndarray | None = None, image: np.ndarray | None = None,
                       box: Sequence[float] | None = None, pixel_map: np.ndarray | None = None, title: str = "",
                       tags: Sequence[str] | None = None, tag_scores: np.ndarray | None = None):
    """Modality attribution (bars), Integrated Gradients per word (bars), over the image's pixels (a signed map:
    red raises the explained output, blue lowers it) or per tag (bars). Panels for the parts given."""
    parts = (["modality"] + (["text"] if word_scores is not None else []) + (["image"] if pixel_map is not None else [])
             + (["tags"] if tag_scores is not None else []))
    widths = {"modality": 1.0, "text": 1.6, "image": 1.0, "tags": 1.2}
    fig = new_figure(3.3 * sum(widths[p] for p in parts), 3.4)
    grid = fig.add_gridspec(1, len(parts), width_ratios=[widths[p] for p in parts])
    what = f"p({target})" if target is not None else "score"
    for i, part in enumerate(parts):
        ax = _panel(fig, grid, i)
        if part == "modality":
            names = list(effects)
            vals = [effects[k] for k in names]
            ax.bar(range(len(names)), vals, color=["#c0392b" if v >= 0 else "#2f5bd3" for v in vals])
            ax.axhline(0, color="black", lw=0.6)
            ax.set_xticks(range(len(names)), names, fontsize=8)
            ax.set_title(f"change of {what} when replaced", fontsize=9)
        elif part == "text":
            _word_bars(ax, words, word_scores, signed=True)
            ax.set_title(f"Integrated Gradients on {what}, per word", fontsize=9)
        elif part == "tags":
            _word_bars(ax, tags, tag_scores, signed=True)
            ax.set_title(f"Integrated Gradients on {what}, per tag", fontsize=9)
        else:
            m = float(np.abs(pixel_map).max()) or 1.0
            im = draw_overlay(ax, image, box, pixel_map, f"Integrated Gradients on {what}, pixels", cmap=SIGNED_CMAP,
                              vmin=-m, vmax=m, alpha=0.65, smooth=False)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _word_bars(ax, words: Sequence[str], values: np.ndarray, signed: bool) -> None:
    words, values = list(words)[:MAX_WORDS], np.asarray(values)[:MAX_WORDS]
    colours = (["#c0392b" if v >= 0 else "#2f5bd3" for v in values] if signed else "#2f5bd3")
    ax.barh(range(len(words)), values, color=colours)
    ax.set_yticks(range(len(words)), words, fontsize=8)
    ax.invert_yaxis()  # reading order, top to bottom
    if signed:
        ax.axvline(0, color="black", lw=0.6)
    ax.tick_params(axis="x", labelsize=7)


def _wrap(text: str, width: int) -> str:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*out, line])


# ------------------------------------------------------------------------------------------ an Explanation
def _title(ex: Explanation, max_text: int = 110) -> str:
    p = ex.prediction
    head = (f"{ex.model}: {p['label']} ({p['probabilities'][p['label']]:.2f})" if "label" in p
            else f"{ex.model}: score {p['score']:.3f}")
    if not ex.text:
        return head
    text = ex.text if len(ex.text) <= max_text else ex.text[: max_text - 1] + "…"
    return f"{head}\n“{text}”"


def figures_for(ex: Explanation, image=None, sources: Sequence[str] = ("similarity", "rollout")) -> dict:
    """The figures an explanation has: ``word_regions`` and ``importance`` (INFIG, with an image), ``word_tags`` and
    ``importance`` (INFIG reading the image as tags), ``attribution`` (every model).

    Args:
        image: the post's image (path, PIL image or array), needed for the image panels.
        sources: the rows of ``word_regions`` (those the explanation has).
    """
    arr, box = _drawable(_as_array(image), ex.image_box) if image is not None else (None, ex.image_box)
    figs = {}
    words = ex.word_texts
    if arr is not None and ex.region_maps and ex.selected_words and ex.tags is None:
        sel = ex.selected_words
        sources = [s for s in sources if s in ex.region_maps]
        rows = [(ex.region_maps[s].label, ex.region_maps[s].maps[sel]) for s in sources]
        if rows:
            figs["word_regions"] = word_region_figure(arr, box, rows, [words[i] for i in sel], _title(ex))
    if ex.tags and ex.region_maps and words:  # tags: every word against every tag the model read
        rows = [(ex.region_maps[s].label, ex.region_maps[s].maps) for s in sources if s in ex.region_maps]
        if rows:
            figs["word_tags"] = word_tag_figure(rows, words, ex.tags, _title(ex))
    if ex.word_importance is not None and (arr is not None or ex.tag_importance is not None):
        tagged = ex.tag_importance is not None
        figs["importance"] = importance_figure(words, ex.word_importance, arr, box,
                                               ex.tag_importance if tagged else ex.region_importance,
                                               ex.image_cls_importance, _title(ex), ex.tags if tagged else None)
    if ex.modality is not None:
        ta, ia, ga = ex.text_attribution, ex.image_attribution, ex.tag_attribution
        figs["attribution"] = attribution_figure(
            ex.modality.effects, ex.modality.target, words if ta is not None else None,
            ta.word_scores if ta is not None else None, arr if ia is not None else None, box,
            ia.pixel_map if ia is not None and arr is not None else None, _title(ex),
            ga.tags if ga is not None else None, ga.tag_scores if ga is not None else None)
    return figs


def _as_array(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    from mmsenti.data.processing import open_image

    return np.asarray(open_image(image).convert("RGB"))


def _drawable(arr: np.ndarray, box: Sequence[float] | None) -> tuple[np.ndarray, Sequence[float] | None]:
    """``arr`` subsampled to at most :data:`MAX_DRAWN_SIDE` pixels a side (every k-th pixel: the panels draw it
    with nearest-neighbour interpolation anyway), and ``box`` in the copy's pixels."""
    h, w = arr.shape[:2]
    k = -(-max(h, w) // MAX_DRAWN_SIDE)
    if k <= 1:
        return arr, box
    small = arr[::k, ::k]
    sh, sw = small.shape[:2]
    if box is not None:  # v * new / old: exact for the whole-image box (integers), so no crop outline appears
        left, top, right, bottom = box
        box = (left * sw / w, top * sh / h, right * sw / w, bottom * sh / h)
    return small, box


def panel_count(fig) -> int:
    return sum(1 for ax in fig.axes if ax.get_label() == PANEL)


def save_png(fig, target: str | Path | io.BytesIO | None = None, dpi: int = 100) -> bytes | None:
    """Write ``fig`` as PNG to a path or buffer (or return the bytes when ``target`` is None)."""
    meta = {"mmsenti:panels": str(panel_count(fig)), "Software": "mmsenti"}
    if target is None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata=meta)
        return buf.getvalue()
    fig.savefig(target, format="png", dpi=dpi, metadata=meta)
    return None
