"""``explain(predictor, sample)``: one post → an :class:`~mmsenti.explain.results.Explanation`."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from mmsenti.data.base import DataError, Sample, text_problem
from mmsenti.data.processing import open_image
from mmsenti.explain import attribution, maps
from mmsenti.explain.neighbours import neighbours_from
from mmsenti.explain.options import ExplainOptions
from mmsenti.explain.results import Explanation, RegionMaps
from mmsenti.explain.text import is_content_word, words_of
from mmsenti.models.explanations import WordRegions

log = logging.getLogger(__name__)

IG_TOLERANCE = 0.05  # |sum of attributions − (f(input) − f(baseline))| above which a note says to raise ig_steps


def explain(predictor, sample: Sample, options: ExplainOptions | None = None,
            neighbour_samples: Mapping[str, Sample] | None = None) -> Explanation:
    """Explain the prediction of ``predictor`` (a :class:`~mmsenti.inference.Predictor`) for one post.

    Every model gets modality attribution and Integrated Gradients; what a model adds (word → region maps,
    retrieved neighbours, notes) comes from its explanation hook (``model.explain_forward``). A model that reads the
    image as the post's tags (the ``tags`` input) is explained over those tags: word → tag maps, IG per tag.

    Args:
        sample: the post; ``image`` a path or PIL image (the original: maps are drawn over it); ``tags`` what a
            tags model reads instead.
        options: what to compute (default :class:`ExplainOptions`).
        neighbour_samples: for a model that retrieves training samples: those samples by id, for the neighbours'
            texts (and labels when the bank stores none).
    """
    from mmsenti.models.base import check_per_post

    # Integrated Gradients run interpolated copies of the post as one batch: in-batch retrieval would retrieve
    # among them.
    check_per_post(predictor.config.model, "explained")
    problem = text_problem(sample.text) if isinstance(sample.text, str) else None
    if problem:
        raise DataError(f"post {sample.id}: its text {problem}")
    options = options or ExplainOptions()
    model, processor, device = predictor.model.eval(), predictor.processor, predictor.device
    reads = predictor.modalities
    tags_input = processor.builder("tags")  # the model reads the image as the post's tags (no pixels)
    pixels_read = "image" in reads and tags_input is None
    image = open_image(sample.image, sample.id) if sample.image is not None and pixels_read else None
    pixels = processor.image_transform(image) if image is not None else None
    # A modality the model does not read passes through untouched (the processor ignores it): replacing it then
    # changes nothing, and its attribution is exactly 0.
    post = Sample(id=sample.id, label=None, text=sample.text, image=pixels if pixels_read else sample.image,
                  features=sample.features, tags=sample.tags)
    batch = attribution.batch_of(processor, post, device)
    batch["ids"] = [attribution.BATCH_ID]
    explained = model.explain_forward(batch, options)
    logits = explained.outputs["logits"].float().cpu().numpy()
    prediction = predictor.decode(logits, [sample.id])[0].to_dict(exclude=("id",))  # the explanation names the post
    target = int(logits[0].argmax()) if predictor.info.task == "classification" else None

    ex = Explanation(id=sample.id, model=predictor.config.model.name, modalities=list(reads), prediction=prediction,
                     text=sample.text)
    tokenizer = processor.tokenizer
    if "input_ids" in batch and sample.text is not None:
        ex.words = words_of(tokenizer, sample.text, processor.max_length, batch["input_ids"][0].tolist())
    grid = attribution.image_grid(model, batch)
    if image is not None:
        t = processor.image_transform
        ex.image_size, ex.image_box, ex.input_size, ex.grid = image.size, t.source_box(*image.size), t.size, grid
    slots: list[int] = []  # tags: the input slots of the post's tags (the others are padding)
    if tags_input is not None and "image" in reads:
        read = tags_input.read(sample.tags)
        slots, ex.tags = [j for j, _, _ in read], [str(tag) for _, tag, _ in read]
        dropped = len(sample.tags or []) - len(read)
        if dropped:
            ex.notes.append(f"{dropped} of the post's {len(sample.tags)} tags were not read (the model reads the "
                            f"first {tags_input.max_tags}, and none that is empty)")
    given = {"text": sample.text, "image": sample.tags if tags_input is not None else sample.image}
    for m in reads:
        if m in given and given[m] is None:
            what = "tags" if m == "image" and tags_input is not None else m
            ex.notes.append(f"the post has no {what}: the model hid it (missing modality), so it is not explained")

    if explained.word_regions is not None and (image is not None or ex.tags) and ex.words:
        _word_region_maps(ex, explained.word_regions, options, slots)

    features = processor.feature_modalities  # read from Sample.features (e.g. MMSA audio/vision)
    present = [m for m in ("text", "image") if getattr(post, m) is not None and m not in features]
    if tags_input is not None:  # the image is its tags: present when the post has some
        present = [m for m in present if m != "image"] + (["image"] if post.tags else [])
    present += [m for m in features if (post.features or {}).get(m) is not None]
    ex.modality = attribution.modality_attribution(model, processor, post, present, target, predictor.label_names,
                                                   device, options)
    if options.integrated_gradients:
        _require_captum()
        if ex.words and getattr(model, "text_encoder", None) is not None:
            ex.text_attribution = attribution.text_integrated_gradients(model, batch, tokenizer, ex.words, target,
                                                                        options)
        if "pixel_values" in batch and image is not None:
            ex.image_attribution = attribution.image_integrated_gradients(model, batch, grid, target, options)
        if ex.tags and model.tag_states_layer() is not None:
            ex.tag_attribution = attribution.tag_integrated_gradients(model, batch, slots, ex.tags, target, options)
    for what, a in (("text", ex.text_attribution), ("image", ex.image_attribution), ("tags", ex.tag_attribution)):
        if a is not None and abs(a.delta) > IG_TOLERANCE:
            ex.notes.append(f"Integrated Gradients on the {what} is not converged: its attributions miss the output "
                            f"change by {a.delta:+.3f} (raise ig_steps, now {options.ig_steps})")
    _select_words(ex, options)
    if explained.neighbours is not None:
        found = explained.neighbours
        ex.neighbours = neighbours_from(found.found, found.ids, predictor.label_names, neighbour_samples)
    ex.notes += explained.notes
    return ex


def _word_region_maps(ex: Explanation, wr: WordRegions, options: ExplainOptions, slots: list[int]) -> None:
    """Word → region maps (HFAM-like token similarity, fusion attention and its rollout) and the attention-pooling
    importance of words and regions; for tags (no grid), word → tag maps over the tags in ``slots``."""
    grid, n_img = wr.grid, wr.num_image_tokens
    attns = [a.float().cpu().numpy() for a in wr.attentions]
    last, n_layers = maps.head_mean(attns[-1]), len(attns)
    found = {}
    if wr.similarity is not None:
        sim = wr.similarity.float().cpu().numpy()
        found["similarity"] = RegionMaps("similarity", wr.similarity_title,
                                         maps.word_region_similarity(sim, ex.words, grid))
    ex.notes += wr.notes
    m, share = maps.word_region_attention(last, ex.words, n_img, grid)
    found["attention"] = RegionMaps("attention", f"fusion attention, last layer ({n_layers}), mean over heads",
                                    m, share)
    roll = maps.attention_rollout(attns, options.rollout_residual)
    m, share = maps.word_region_attention(roll, ex.words, n_img, grid)
    found["rollout"] = RegionMaps("rollout", f"attention rollout over {n_layers} fusion layers", m, share)
    pool = wr.pool_weights.float().cpu().numpy()
    ex.word_importance, per_token, ex.image_cls_importance = maps.pooling_importance(pool, ex.words, n_img, grid)
    if grid is None:  # tags: the post's tags only (padding slots get no attention, and are not shown)
        for r in found.values():
            r.maps = r.maps[:, slots]
        ex.tag_importance = per_token[slots]
    else:
        ex.region_importance = per_token
    ex.region_maps = found


def _select_words(ex: Explanation, options: ExplainOptions) -> None:
    texts = [w.text.lower() for w in ex.words]
    if options.select:
        missing = [w for w in options.select if w.lower() not in texts]
        if missing:
            ex.notes.append(f"not among the words the model read: {', '.join(missing)}")
        ex.selected_words = [texts.index(w.lower()) for w in options.select if w.lower() in texts]
        return
    score = ex.word_importance
    if score is None and ex.text_attribution is not None:
        score = np.abs(ex.text_attribution.word_scores)
    if score is None:
        return
    order = [i for i in np.argsort(-score, kind="stable") if is_content_word(ex.words[i].text)]
    ex.selected_words = [int(i) for i in order[: options.words]]


def _require_captum() -> None:
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        from mmsenti.data.base import DataError

        raise DataError("Integrated Gradients need Captum: pip install 'mmsenti[explain]' "
                        "(or skip them: --no-ig, integrated_gradients=False)") from None
