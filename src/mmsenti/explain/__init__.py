"""Explanations of one prediction: why the model said what it said.

* every model: **modality attribution** by replacement (the image replaced by a neutral one, the text by an empty
  one, both, and the interaction) and **Integrated Gradients** (Captum) over the text embeddings and the image
  pixels, or the tag embeddings of a model that reads the image as tags (:mod:`mmsenti.explain.attribution`);
* INFIG: **word → region maps** from HFAM's token-wise similarity (what the fine-grained loss trains) and from
  the fusion transformer's attention (last layer, or rollout across layers), and token / region importance from
  the attention pooling (:mod:`mmsenti.explain.maps`); over tags, a word × tag table;
* RAHP: the **retrieved neighbours** each target modality's sample-level context was built from
  (:mod:`mmsenti.explain.neighbours`).

``explain(predictor, sample, options)`` returns an :class:`Explanation` (typed, ``to_dict()`` for JSON);
:mod:`mmsenti.explain.figures` draws it (matplotlib, Agg; functions take arrays and return a Figure). Entry points:
``Predictor.explain``, ``mmsenti explain``, ``POST /v1/explain``. What each map means: docs/explain.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExplainOptions", "Explanation", "explain"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI's parser imports mmsenti.explain.command, which must not import torch.
    if name == "explain":
        from mmsenti.explain.core import explain

        return explain
    if name == "ExplainOptions":
        from mmsenti.explain.options import ExplainOptions

        return ExplainOptions
    if name == "Explanation":
        from mmsenti.explain.results import Explanation

        return Explanation
    raise AttributeError(f"module 'mmsenti.explain' has no attribute {name!r}")
