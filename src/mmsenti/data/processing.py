"""Turn samples into model inputs: the input builders a model declares, composed; saved with every trained model.

A saved ``preprocessing.json`` lists the builders (kind, what it reads, its settings) beside the files they write
(``tokenizer/``, ...). Folders written before input builders existed (keys by mode, one tokenizer, transforms)
are read through :func:`legacy_builders`, so they load and predict as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmsenti.backbones.transforms import ImageTransform
from mmsenti.config import InputSpec
from mmsenti.data.base import Sample
from mmsenti.data.encoder_inputs import SPECIAL_TOKENS, train_wordpiece_tokenizer
from mmsenti.data.inputs import (
    BuildContext,
    ClipInput,
    FeaturesInput,
    InputBuilder,
    PixelsInput,
    TokensInput,
    collate_sequences,
    open_image,
)
from mmsenti.errors import ModelFileError, RegistryError
from mmsenti.utils import read_json

# Their home was this module; named here too, where callers import them from.
__all__ = ["ImageTransform", "Processor", "SPECIAL_TOKENS", "collate_sequences", "legacy_builders", "open_image",
           "train_wordpiece_tokenizer"]

log = logging.getLogger(__name__)

FILE = "preprocessing.json"
FORMAT = 2  # 1 (no "format" key): keys by mode, one tokenizer and the transforms (see legacy_builders)


class Processor:
    """Collate samples into a batch dict: each input builder's keys, ``labels`` and ``ids``.

    A training batch may carry inputs that only the training losses read (INFIG's CLIP inputs: builders of
    ``training_only`` specs); an evaluation / prediction batch never does. With :attr:`allow_missing` a sample may
    lack its text or image: it gets an empty text / a zero image and the batch says which are real in
    ``text_present`` / ``image_present`` ((B,) bool), for models that can mask a modality.
    """

    def __init__(self, builders: Sequence[InputBuilder], modalities: Sequence[str], task: str = "classification"):
        self.builders = list(builders)
        self.modalities = list(modalities)
        self.task = task
        self.allow_missing = False

    @classmethod
    def create(cls, model_config: Any, train_texts: Sequence[str], task: str) -> Processor:
        """The preprocessing of a model about to be trained: a builder per input it declares
        (``model_config.inputs()``), made from its config (a from-scratch tokenizer learns on ``train_texts``)."""
        from mmsenti.registry import INPUTS

        made: list[InputBuilder] = []
        for spec in model_config.inputs():
            made.append(INPUTS.get(spec.kind).builder.create(model_config, spec, train_texts, made))
        return cls(made, model_config.modalities, task)

    # ------------------------------------------------------------------------------------------------ views
    def active(self, training: bool = True) -> list[InputBuilder]:
        """The builders of training batches (default, all) or of evaluation/prediction batches."""
        return [b for b in self.builders if training or not b.training_only]

    def keys(self, training: bool = True) -> list[str]:
        """The batch keys built for training (default, a superset) or for evaluation/prediction."""
        return [k for b in self.active(training) for k in b.keys()]

    @property
    def inputs(self) -> dict[str, list[str]]:
        return {"train": self.keys(True), "eval": self.keys(False)}

    def _first(self, cls: type) -> Any:
        return next((b for b in self.builders if isinstance(b, cls)), None)

    def builder(self, kind: str) -> InputBuilder | None:
        """The builder of the input ``kind`` (a registered name: ``tokens``, ``tags``, ...), or None."""
        from mmsenti.registry import INPUTS

        cls = INPUTS.get(kind).builder
        return self._first(cls)

    @property
    def post_fields(self) -> dict[str, str]:
        """Modality → the field of a post that carries it (a prediction row, a served post): the modality's own name,
        or what its builder reads instead (``tags`` for the image of a model whose image encoder is ``tags``)."""
        out = {m: m for m in self.modalities}
        for b in self.active(training=False):
            if b.post_field is not None and b.modality in out:
                out[b.modality] = b.post_field
        return out

    @property
    def tokenizer(self):
        """The text tokenizer (of the ``tokens`` input), or None."""
        tokens = self._first(TokensInput)
        return tokens.tokenizer if tokens is not None else None

    @property
    def max_length(self) -> int | None:
        tokens = self._first(TokensInput)
        return tokens.max_length if tokens is not None else None

    @property
    def image_transform(self) -> ImageTransform | None:
        """The image transform (of the ``pixels`` input), or None."""
        pixels = self._first(PixelsInput)
        return pixels.transform if pixels is not None else None

    @image_transform.setter
    def image_transform(self, transform: ImageTransform) -> None:
        self._first(PixelsInput).transform = transform

    @property
    def feature_modalities(self) -> list[str]:
        """Modalities read from ``Sample.features`` as (T, D) sequences (MMSA audio/vision, or text features)."""
        return [b.modality for b in self.builders if isinstance(b, FeaturesInput)]

    @property
    def reads_images(self) -> bool:
        return any(isinstance(b, (PixelsInput, ClipInput)) for b in self.builders)

    def image_tensor(self, image: Any, sample_id: str = "?") -> torch.Tensor:
        """One sample's ``pixel_values`` (3, H, W): decode (a path or PIL image) + transform."""
        return self._first(PixelsInput).image_tensor(image, sample_id)

    def prepare(self, sample: Sample) -> Sample:
        """One post made ready on its own, before it joins a batch, so that what can fail for one post fails there
        (a served post's 422, a prediction row's error) and not in its batch: a clip model's features are extracted
        from ``sample.video`` here. The other inputs have nothing to do."""
        for builder in self.active(training=False):
            sample = builder.prepare(sample)
        return sample

    # ------------------------------------------------------------------------------------------------ batch
    def __call__(self, samples: Sequence[Sample], load_images: bool = True, training: bool = True,
                 without: Sequence[str] = ()) -> dict[str, Any]:
        """The batch dict.

        Args:
            load_images: False skips reading images (their features come from the frozen-feature cache).
            training: build the training inputs (default) or only those evaluation and prediction read.
            without: keys not to build (their features come from the frozen-feature cache).
        """
        ctx = BuildContext(samples, load_images=load_images, allow_missing=self.allow_missing, without=without)
        batch: dict[str, Any] = {"ids": [s.id for s in samples]}
        for builder in self.active(training):
            builder.build(samples, batch, ctx)
        labels = [s.label for s in samples]
        if all(lab is not None for lab in labels):
            dtype = torch.long if self.task == "classification" else torch.float32
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch

    def for_inference(self) -> Processor:
        """A copy that builds (and saves) only the evaluation inputs (no CLIP tokenizer or transform)."""
        return Processor(self.active(training=False), self.modalities, self.task)

    def fingerprint(self) -> list[dict[str, Any]]:
        """What of the preprocessing determines features computed from its batches (the feature cache's key)."""
        return [{"kind": b.spec.kind, "modality": b.modality, **b.fingerprint()} for b in self.builders]

    # ------------------------------------------------------------------------------------------ persistence
    def files(self) -> list[str]:
        """Names of everything :meth:`save` writes into a folder."""
        return [FILE, *(f for b in self.builders for f in b.files())]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "modalities": self.modalities, "task": self.task,
                "builders": [{"kind": b.spec.kind, "modality": b.modality, "training_only": b.training_only,
                              "options": b.spec.options, "state": b.state()} for b in self.builders]}
        (directory / FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for b in self.builders:
            b.save(directory)

    @classmethod
    def load(cls, directory: str | Path, model_config: Any = None) -> Processor:
        """The processor saved in ``directory``. ``model_config``: the model's config, which gives a folder written
        before input builders the settings it did not record (the width of feature sequences)."""
        from mmsenti.registry import INPUTS

        directory = Path(directory)
        path = directory / FILE
        if not path.is_file():
            raise ModelFileError(f"not a saved mmsenti model: {path} is missing")
        meta = read_json(path, "preprocessing description")
        if not isinstance(meta, dict) or not isinstance(meta.get("modalities"), list):
            raise ModelFileError(f"{path}: expected an object with 'modalities'")
        if not isinstance(meta.get("format", 1), int) or meta.get("format", 1) > FORMAT:
            raise ModelFileError(f"{path}: preprocessing format {meta.get('format')!r} is newer than this mmsenti "
                                 f"reads ({FORMAT}); upgrade mmsenti")
        task = meta.get("task", "classification")
        if "builders" not in meta:
            return cls(legacy_builders(meta, directory, model_config), meta["modalities"], task)
        builders = []
        for entry in meta["builders"]:
            spec = InputSpec(entry["kind"], entry.get("modality"), entry.get("training_only", False),
                             entry.get("options") or {})
            try:
                kind = INPUTS.get(spec.kind).builder
            except RegistryError as e:
                raise ModelFileError(f"{path}: the model reads an input this installation does not know ({e}); "
                                     "install the package that provides it") from None
            builders.append(kind.load(spec, entry.get("state") or {}, directory))
        return cls(builders, meta["modalities"], task)


def legacy_builders(meta: dict[str, Any], directory: Path, model_config: Any = None) -> list[InputBuilder]:
    """The builders of a ``preprocessing.json`` written before input builders (format 1): batch keys by mode
    (``inputs``; or, older still, none: the keys of the modalities), ``max_length`` and ``tokenizer/``, the image
    transform, ``feature_modalities``, and a CLIP prior's transform, ``clip_max_length`` and ``clip_tokenizer/``."""
    inputs = meta.get("inputs")
    if not isinstance(inputs, dict):  # saved before models declared their inputs
        mods, feats = meta["modalities"], list(meta.get("feature_modalities", ()))
        keys = [*(("input_ids",) if "text" in mods and "text" not in feats else ()),
                *(("pixel_values",) if "image" in mods else ()), *(f"{m}_features" for m in feats)]
        clip = [*(("clip_input_ids",) if (directory / ClipInput.directory).is_dir() else ()),
                *(("clip_pixel_values",) if meta.get("clip_transform") else ())]
        inputs = {"train": keys + clip, "eval": keys}
    declared = {(s.kind, s.modality): s for s in model_config.inputs()} if model_config is not None else {}

    def spec(kind: str, modality: str | None, key: str) -> InputSpec:
        options = declared[(kind, modality)].options if (kind, modality) in declared else {}
        return InputSpec(kind, modality, key not in inputs["eval"], options)

    builders: list[InputBuilder] = []
    for key in inputs["train"]:
        if key == "input_ids":
            builders.append(TokensInput.load(spec("tokens", "text", key), {"max_length": meta["max_length"]},
                                             directory))
        elif key == "pixel_values":
            builders.append(PixelsInput.load(spec("pixels", "image", key), {"transform": meta["image_transform"]},
                                             directory))
        elif key.endswith("_features"):
            builders.append(FeaturesInput(spec("features", key[: -len("_features")], key)))
        elif key in ("clip_input_ids", "clip_pixel_values") and not any(isinstance(b, ClipInput) for b in builders):
            state = {"max_length": meta.get("clip_max_length", 77), "transform": meta.get("clip_transform")}
            builders.append(ClipInput.load(spec("clip", None, key), state, directory))
    return builders
