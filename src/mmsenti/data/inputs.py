"""Input builders: each kind of model input is a class that builds its keys of a batch from the samples.

A model declares the inputs it reads as :class:`~mmsenti.config.InputSpec`\\ s (``ModelConfig.inputs``); the
:class:`~mmsenti.data.processing.Processor` makes one builder per spec and composes them. A builder also says how it
is saved with a trained model, what of it the frozen-feature cache hashes, and what its tensors are in an exported
graph. So a new kind of input (feature sequences, tag lists, a video) is a new builder registered here or in a
plugin (``@INPUTS.register("kind")`` on the class), never a branch in shared code.

The kinds mmsenti brings: ``tokens`` (the text encoder's tokenizer), ``pixels`` (the image encoder's transform),
``features`` (a (T, D) sequence of ``Sample.features[m]``), ``clip`` (a CLIP prior's own tokenizer and transform).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmsenti.backbones.transforms import ImageTransform
from mmsenti.config import InputSpec
from mmsenti.data.base import MAX_TAG_CHARS, Sample
from mmsenti.errors import DataError, ExportError, ModelFileError
from mmsenti.registry import INPUTS

GraphInput = tuple[str, str, list[int | str]]  # an exported graph's input: name, numpy dtype, shape (str: dynamic)


# ---------------------------------------------------------------------------------------------------- helpers
def open_image(image: Any, sample_id: str = "?") -> Image.Image:
    """A sample's image as RGB PIL: in-memory images pass through, paths are read (errors name the file)."""
    if isinstance(image, Image.Image):
        return image
    if image is None:
        raise DataError(f"sample {sample_id}: no image, but the model reads images (set model.modalities)")
    from mmsenti.data.formats.images import image_size_text

    size = None
    try:
        with Image.open(image) as im:
            # Refused before decoding: a decompression bomb is a small file that decodes to gigabytes.
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                size = im.size
                raise Image.DecompressionBombError("over the limit")
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"sample {sample_id}: image file not found: {image}") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"sample {sample_id}: image {image} is too large ({image_size_text(e, size)}; the limit is "
                        f"{Image.MAX_IMAGE_PIXELS} pixels, data.max_image_pixels): refused") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"sample {sample_id}: cannot read image {image}: {e}") from None


def collate_sequences(samples: Sequence[Sample], modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad each sample's ``features[modality]`` (T_i, D) to (B, T_max, D) with a (B, T_max) 0/1 mask."""
    seqs = []
    for s in samples:
        x = (s.features or {}).get(modality)
        if x is None:
            raise DataError(f"sample {s.id}: no '{modality}' features, but the model reads them "
                            "(switch the modality off in model.modalities)")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise DataError(f"sample {s.id}: '{modality}' features must be (T, D), got shape {x.shape}")
        seqs.append(x)
    dims = {x.shape[1] for x in seqs}
    if len(dims) > 1:
        raise DataError(f"'{modality}' features have different widths in one batch: {sorted(dims)}")
    t_max = max(1, max(len(x) for x in seqs))
    out = torch.zeros(len(seqs), t_max, dims.pop())
    mask = torch.zeros(len(seqs), t_max, dtype=torch.long)
    for i, x in enumerate(seqs):
        out[i, : len(x)] = torch.from_numpy(x)
        mask[i, : len(x)] = 1
    return out, mask


def random_lengths(b: int, s: int, low: int, g: torch.Generator) -> torch.Tensor:
    """Per-row lengths in [low, s], the first row full (so the batch is as long as the axis): generated inputs."""
    lengths = torch.randint(low, s + 1, (b,), generator=g)
    lengths[0] = s
    return lengths


def tokenizer_fingerprint(tok) -> str | None:
    """A hash of a tokenizer's vocabulary and rules (not of per-call settings such as padding)."""
    if tok is None:
        return None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for key in ("truncation", "padding"):  # set by each call; max_length is hashed on its own
            state.pop(key, None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _load_tokenizer_dir(path: Path, load):
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a damaged tokenizer folder
        raise ModelFileError(f"{path}/: cannot load the tokenizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); the folder is damaged") from None


class BuildContext:
    """One call of the processor: what it asks of its builders (``without``: keys the caller does not need, e.g.
    those the feature cache supplies), and what they share (each image decoded once, whichever builders read it)."""

    def __init__(self, samples: Sequence[Sample], *, load_images: bool = True, allow_missing: bool = False,
                 without: Sequence[str] = ()):
        self.samples, self.load_images, self.allow_missing = samples, load_images, allow_missing
        self.without = frozenset(without)
        self._images: dict[int, Image.Image] = {}
        self._clips: dict[int, dict[str, np.ndarray]] = {}

    def wants(self, key: str) -> bool:
        return key not in self.without

    def image(self, i: int) -> Image.Image:
        """Sample ``i``'s image, decoded once per call."""
        if i not in self._images:
            s = self.samples[i]
            self._images[i] = open_image(s.image, s.id)
        return self._images[i]

    def clip_features(self, i: int, extraction: dict[str, Any]) -> dict[str, np.ndarray]:
        """Sample ``i``'s clip (``Sample.video``) through ``extraction``'s extractors, once per call whichever
        builders read it (audio and vision come from one pass of the extractors)."""
        if i not in self._clips:
            from mmsenti.data.video.extraction import cached_extraction

            s = self.samples[i]
            if s.video is None:
                raise DataError(f"sample {s.id}: no video, and no features extracted from one")
            self._clips[i], _ = cached_extraction(extraction)(s.video)
        return self._clips[i]


# ---------------------------------------------------------------------------------------------- the protocol
class InputBuilder:
    """Builds the batch keys of one input a model reads (see the module docstring).

    A subclass defines :meth:`keys_of` and :meth:`build`, usually :meth:`create` (from the model's config), and,
    for a builder with settings or files, :meth:`state` / :meth:`files` / :meth:`save` / :meth:`load`; for export,
    :meth:`graph_inputs` and :meth:`example`.
    """

    # Generated export inputs draw random numbers builder by builder in this order (fixed, so `export --check`
    # rebuilds the inputs an export was checked on).
    draw_order: ClassVar[int] = 100
    # What of a post (a DatasetBundle modality) the builder reads, when not its spec's modality (tags for the image).
    reads: ClassVar[str | None] = None

    def __init__(self, spec: InputSpec):
        self.spec = spec

    @property
    def modality(self) -> str | None:
        return self.spec.modality

    @property
    def post_field(self) -> str | None:
        """The field of a post (a prediction row, a served post) this builder reads: :attr:`reads`, else None (the
        modality's own name)."""
        return self.reads

    @property
    def training_only(self) -> bool:
        return self.spec.training_only

    @classmethod
    def keys_of(cls, spec: InputSpec) -> tuple[str, ...]:
        """The batch keys a builder of ``spec`` produces."""
        raise NotImplementedError

    def keys(self) -> tuple[str, ...]:
        return self.keys_of(self.spec)

    @classmethod
    def create(cls, model_config: Any, spec: InputSpec, train_texts: Sequence[str],
               made: Sequence[InputBuilder]) -> InputBuilder:
        """The builder for a model being trained (``made``: the builders of its earlier inputs)."""
        return cls(spec)

    def build(self, samples: Sequence[Sample], batch: dict[str, Any], ctx: BuildContext) -> None:
        """Add this input's keys (those ``ctx`` wants) for ``samples`` to ``batch``."""
        raise NotImplementedError

    def prepare(self, sample: Sample) -> Sample:
        """``sample`` with the work done that can fail for it alone (see :meth:`Processor.prepare`)."""
        return sample

    # ------------------------------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """Settings saved in ``preprocessing.json`` (JSON); :meth:`load` gets them back."""
        return {}

    def files(self) -> list[str]:
        """Names of the files or folders :meth:`save` writes beside ``preprocessing.json``."""
        return []

    def save(self, directory: Path) -> None:
        """Write :meth:`files` into ``directory``."""

    @classmethod
    def load(cls, spec: InputSpec, state: dict[str, Any], directory: Path) -> InputBuilder:
        return cls(spec, **state)

    def fingerprint(self) -> dict[str, Any]:
        """What of this input determines features computed from it (the frozen-feature cache hashes it)."""
        return self.state()

    # ----------------------------------------------------------------------------------------------- export
    def graph_inputs(self) -> list[GraphInput]:
        """The tensors of :meth:`keys` as an exported graph takes them (a string axis is dynamic)."""
        raise ExportError(f"model input '{self.spec.kind}' has no graph form")

    def axis_limits(self) -> dict[str, int]:
        """Largest sizes of dynamic axes (e.g. a tokenizer's maximum length)."""
        return {}

    def example(self, batch_size: int, length: int | None, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Random valid inputs of ``batch_size`` posts (``length``: of the sequence axis; None = the longest)."""
        raise ExportError(f"model input '{self.spec.kind}' cannot generate examples")


# ------------------------------------------------------------------------------------------------- built-ins
@INPUTS.register("tokens", description="input_ids + attention_mask: the text through the text encoder's tokenizer")
class TokensInput(InputBuilder):
    """The post's text tokenized, padded to the longest in the batch, truncated at ``max_length``. With missing
    modalities allowed, ``text_present`` says which posts have a text (the others are tokenized as "")."""

    draw_order = 0
    directory = "tokenizer"

    def __init__(self, spec: InputSpec, tokenizer, max_length: int):
        super().__init__(spec)
        self.tokenizer, self.max_length = tokenizer, max_length

    @classmethod
    def keys_of(cls, spec: InputSpec) -> tuple[str, ...]:
        return ("input_ids", "attention_mask")

    @classmethod
    def create(cls, model_config, spec, train_texts, made) -> TokensInput:
        from mmsenti.data.encoder_inputs import build_tokenizer, text_max_length

        return cls(spec, build_tokenizer(model_config.text_encoder, train_texts),
                   text_max_length(model_config.text_encoder))

    def build(self, samples, batch, ctx) -> None:
        texts = [s.text if s.text is not None else "" for s in samples]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch["input_ids"] = enc["input_ids"]
        batch["attention_mask"] = enc["attention_mask"]
        if ctx.allow_missing:
            batch["text_present"] = torch.tensor([s.text is not None for s in samples])

    def state(self) -> dict[str, Any]:
        return {"max_length": self.max_length}

    def files(self) -> list[str]:
        return [self.directory]

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory / self.directory))

    @classmethod
    def load(cls, spec, state, directory) -> TokensInput:
        from transformers import AutoTokenizer

        path = directory / cls.directory
        if not path.is_dir():
            raise ModelFileError(f"{path}/: missing (this model reads text; the folder is incomplete)")
        return cls(spec, _load_tokenizer_dir(path, lambda d: AutoTokenizer.from_pretrained(str(d))),
                   state["max_length"])

    def fingerprint(self) -> dict[str, Any]:
        return {"tokenizer": tokenizer_fingerprint(self.tokenizer), "max_length": self.max_length}

    def graph_inputs(self) -> list[GraphInput]:
        return [(k, "int64", ["batch", "sequence"]) for k in self.keys()]

    def axis_limits(self) -> dict[str, int]:
        return {"sequence": self.max_length}  # token sequences never exceed the tokenizer's maximum length

    def example(self, batch_size, length, g) -> dict[str, torch.Tensor]:
        s = length or self.max_length
        ids = torch.randint(0, len(self.tokenizer), (batch_size, s), generator=g)
        mask = (torch.arange(s)[None] < random_lengths(batch_size, s, 1, g)[:, None]).long()
        return {"input_ids": ids.masked_fill(mask == 0, self.tokenizer.pad_token_id or 0), "attention_mask": mask}


@INPUTS.register("pixels", description="pixel_values: the image decoded and transformed as the image encoder asks")
class PixelsInput(InputBuilder):
    """The post's image as (3, size, size) pixel values. A sample's ``image`` may be a path, a PIL image, or its
    already transformed pixel values (from :meth:`image_tensor` in a DataLoader worker or a service's decoding
    thread). With missing modalities allowed, ``image_present`` says which posts have an image (the others get
    a zero image, which the model hides)."""

    draw_order = 1

    def __init__(self, spec: InputSpec, transform: ImageTransform):
        super().__init__(spec)
        self.transform = transform

    @classmethod
    def keys_of(cls, spec: InputSpec) -> tuple[str, ...]:
        return ("pixel_values",)

    @classmethod
    def create(cls, model_config, spec, train_texts, made) -> PixelsInput:
        from mmsenti.data.encoder_inputs import image_transform

        return cls(spec, image_transform(model_config.image_encoder))

    def image_tensor(self, image: Any, sample_id: str = "?") -> torch.Tensor:
        """One sample's pixel values (3, H, W): decode (a path or PIL image) + transform."""
        return self.transform(open_image(image, sample_id))

    def build(self, samples, batch, ctx) -> None:
        if not (ctx.load_images and ctx.wants("pixel_values")):
            return
        if ctx.allow_missing:
            batch["image_present"] = torch.tensor([s.image is not None for s in samples])
        pix = []
        for i, s in enumerate(samples):
            if isinstance(s.image, torch.Tensor):  # already decoded and transformed
                pix.append(s.image)
            elif s.image is None and ctx.allow_missing:
                pix.append(torch.zeros(3, self.transform.size, self.transform.size))  # hidden (image_present)
            else:
                pix.append(self.transform(ctx.image(i)))
        batch["pixel_values"] = torch.stack(pix)

    def state(self) -> dict[str, Any]:
        return {"transform": asdict(self.transform)}

    @classmethod
    def load(cls, spec, state, directory) -> PixelsInput:
        return cls(spec, ImageTransform(**state["transform"]))

    def fingerprint(self) -> dict[str, Any]:
        return {"image_transform": asdict(self.transform)}

    def graph_inputs(self) -> list[GraphInput]:
        return [("pixel_values", "float32", ["batch", 3, self.transform.size, self.transform.size])]

    def example(self, batch_size, length, g) -> dict[str, torch.Tensor]:
        size = self.transform.size
        return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=g)}


@INPUTS.register("features", description="<m>_features + <m>_mask: a (T, D) sequence of Sample.features[m], "
                                         "zero-padded")
class FeaturesInput(InputBuilder):
    """Modality ``spec.modality``'s feature sequence (MMSA audio/vision, or text features); ``spec.options["dim"]``
    is the width D of its vectors (needed to describe an exported graph).

    With ``spec.options["extraction"]`` (a model trained on ``mmsenti features extract``'s output) a post is a clip:
    a sample without the features but with a ``video`` is extracted here with the model's own settings.
    """

    draw_order = 2

    @classmethod
    def keys_of(cls, spec: InputSpec) -> tuple[str, ...]:
        return (f"{spec.modality}_features", f"{spec.modality}_mask")

    @property
    def extraction(self) -> dict[str, Any] | None:
        return self.spec.options.get("extraction") or None

    @property
    def post_field(self) -> str | None:
        return "video" if self.extraction else None

    def prepare(self, sample: Sample) -> Sample:
        if not self.extraction or sample.video is None or (sample.features or {}).get(self.modality) is not None:
            return sample
        from mmsenti.data.video.extraction import cached_extraction

        extracted, _ = cached_extraction(self.extraction)(sample.video)
        return dataclasses.replace(sample, features={**(sample.features or {}), **extracted})

    def build(self, samples, batch, ctx) -> None:
        features, mask = self.keys()
        if self.extraction and any((s.features or {}).get(self.modality) is None for s in samples):
            samples = [s if (s.features or {}).get(self.modality) is not None or s.video is None else
                       dataclasses.replace(s, features={**(s.features or {}),
                                                        **ctx.clip_features(i, self.extraction)})
                       for i, s in enumerate(samples)]
        batch[features], batch[mask] = collate_sequences(samples, self.modality)

    @property
    def dim(self) -> int:
        dim = self.spec.options.get("dim")
        if not dim:
            raise ExportError(f"the width of the '{self.modality}' features is not known (model.feature_dims)")
        return int(dim)

    def graph_inputs(self) -> list[GraphInput]:
        features, mask = self.keys()
        axis = f"{self.modality}_sequence"
        return [(features, "float32", ["batch", axis, self.dim]), (mask, "int64", ["batch", axis])]

    def example(self, batch_size, length, g) -> dict[str, torch.Tensor]:
        features, mask = self.keys()
        t = length or 24
        return {features: torch.randn(batch_size, t, self.dim, generator=g),
                mask: (torch.arange(t)[None] < random_lengths(batch_size, t, 0, g)[:, None]).long()}


@INPUTS.register("clip", description="clip_input_ids + clip_attention_mask + clip_pixel_values: a CLIP prior's own "
                                     "tokenizer and image transform")
class ClipInput(InputBuilder):
    """What a frozen CLIP prior reads (INFIG's GAM): the text through CLIP's tokenizer and the image (itself, not
    pixel values made for another encoder) through CLIP's transform; the model config's ``clip`` says which CLIP."""

    directory = "clip_tokenizer"
    TEXT_KEYS = ("clip_input_ids", "clip_attention_mask")
    PIXEL_KEY = "clip_pixel_values"

    def __init__(self, spec: InputSpec, tokenizer, transform: ImageTransform | None):
        super().__init__(spec)
        self.tokenizer, self.transform = tokenizer, transform

    @classmethod
    def keys_of(cls, spec: InputSpec) -> tuple[str, ...]:
        return (*cls.TEXT_KEYS, cls.PIXEL_KEY)

    def keys(self) -> tuple[str, ...]:
        return (*(self.TEXT_KEYS if self.tokenizer is not None else ()),
                *((self.PIXEL_KEY,) if self.transform is not None else ()))

    @classmethod
    def create(cls, model_config, spec, train_texts, made) -> ClipInput:
        from mmsenti.data.encoder_inputs import clip_preprocessing

        text = next((b.tokenizer for b in made if isinstance(b, TokensInput)), None)
        return cls(spec, *clip_preprocessing(model_config.clip, text))

    def build(self, samples, batch, ctx) -> None:
        if self.transform is not None and ctx.load_images and ctx.wants(self.PIXEL_KEY):
            pix = []
            for i, s in enumerate(samples):
                if isinstance(s.image, torch.Tensor):
                    raise DataError(f"sample {s.id}: CLIP inputs need the image itself, not its pixel values")
                pix.append(self.transform(ctx.image(i)))
            batch[self.PIXEL_KEY] = torch.stack(pix)
        if self.tokenizer is not None and ctx.wants(self.TEXT_KEYS[0]):
            enc = self.tokenizer([s.text or "" for s in samples])
            batch[self.TEXT_KEYS[0]], batch[self.TEXT_KEYS[1]] = enc["input_ids"], enc["attention_mask"]

    def state(self) -> dict[str, Any]:
        return {"max_length": self.tokenizer.max_length if self.tokenizer is not None else None,
                "transform": asdict(self.transform) if self.transform is not None else None}

    def files(self) -> list[str]:
        return [self.directory] if self.tokenizer is not None else []

    def save(self, directory: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(directory / self.directory)

    @classmethod
    def load(cls, spec, state, directory) -> ClipInput:
        from mmsenti.backbones.clip import ClipTokenizer

        path = directory / cls.directory
        tok = _load_tokenizer_dir(path, lambda d: ClipTokenizer.load(d, state["max_length"])) if path.is_dir() else None
        return cls(spec, tok, ImageTransform(**state["transform"]) if state.get("transform") else None)

    def fingerprint(self) -> dict[str, Any]:
        return {"clip_tokenizer": tokenizer_fingerprint(self.tokenizer), **self.state()}


# ------------------------------------------------------------------------------------------------------ tags


TAG_CACHE_SIZE = 65536  # distinct tags whose pieces a builder keeps (a long-running service sees unbounded ones)


def normalize_tag(tag: Any) -> str:
    """A tag as the encoders read it: a string, lower-cased, inner whitespace collapsed."""
    return " ".join(str(tag).lower().split())[:MAX_TAG_CHARS]


def tag_bucket(tag: str, buckets: int) -> int:
    """A tag's row of the learned table: a stable hash (not Python's, which changes per process); 0 is padding."""
    digest = hashlib.blake2b(tag.encode("utf-8"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


@INPUTS.register("tags", description="tag_ids + tag_mask: a post's tags (Sample.tags), one row of word pieces or "
                                     "a hashed id per tag, padded to max_tags")
class TagsInput(InputBuilder):
    """A post's tags for the ``tags`` image encoder: ``tag_ids`` (B, max_tags, P) and ``tag_mask`` (B, max_tags, P),
    1 for a real piece. The tag axis has a fixed length (max_tags), so the frozen tag embeddings are cached per post
    and an exported graph has a static tag axis; tags have no order the encoder reads (no position embedding).

    ``spec.options["embedding"]``: ``learned`` (P = 1: the tag's hash bucket, see :func:`tag_bucket`), ``vocab``
    (the tag's first P word pieces through the text backbone's tokenizer, no special tokens) or ``encoder`` (the
    same with [CLS]/[SEP], as the text backbone reads a sentence). A post with more tags keeps the first
    max_tags; a post without tags (``allow_missing``) gets none, and ``image_present`` says so.
    """

    draw_order = 2
    reads = "tags"
    directory = "tag_tokenizer"

    def __init__(self, spec: InputSpec, max_tags: int, pieces: int, buckets: int, tokenizer=None):
        super().__init__(spec)
        self.max_tags, self.pieces, self.buckets, self.tokenizer = max_tags, pieces, buckets, tokenizer
        # tag -> its pieces: a dataset has a few thousand distinct tags; a served model meets any, so it is bounded
        self._cache: dict[str, list[int]] = {}

    @property
    def embedding(self) -> str:
        return self.spec.options.get("embedding", "learned")

    @classmethod
    def keys_of(cls, spec: InputSpec) -> tuple[str, ...]:
        return ("tag_ids", "tag_mask")

    @classmethod
    def create(cls, model_config, spec, train_texts, made) -> TagsInput:
        cfg = model_config.image_encoder
        if cfg.max_tags < 1 or cfg.tag_pieces < 1 or cfg.tag_buckets < 2:
            raise DataError("model.image_encoder: max_tags and tag_pieces must be >= 1 and tag_buckets >= 2")
        if spec.options.get("embedding", "learned") == "learned":
            return cls(spec, cfg.max_tags, 1, cfg.tag_buckets)
        tok = next((b.tokenizer for b in made if isinstance(b, TokensInput)), None)
        if tok is None:  # a tags-only model: the text backbone's tokenizer all the same (its vocabulary embeds tags)
            from mmsenti.data.encoder_inputs import build_tokenizer

            tok = build_tokenizer(model_config.text_encoder, train_texts)
        return cls(spec, cfg.max_tags, cfg.tag_pieces, cfg.tag_buckets, tok)

    def tag_pieces(self, tag: str) -> list[int]:
        if tag not in self._cache:
            if self.tokenizer is None:
                ids = [tag_bucket(tag, self.buckets)]
            else:
                special = self.embedding == "encoder"
                ids = self.tokenizer(tag, add_special_tokens=special)["input_ids"]
                ids = ids[: self.pieces - 1] + ids[-1:] if special and len(ids) > self.pieces else ids[: self.pieces]
            if len(self._cache) >= TAG_CACHE_SIZE:
                self._cache.clear()
            self._cache[tag] = ids
        return self._cache[tag]

    def read(self, tags: Sequence[Any] | None) -> list[tuple[int, Any, list[int]]]:
        """(slot, the tag as given, its pieces) of each tag of a post that the model reads: of the first max_tags,
        those with a piece (an empty tag leaves its slot padding, as every slot after the post's tags)."""
        out = []
        for j, tag in enumerate((tags or [])[: self.max_tags]):
            norm = normalize_tag(tag)
            pieces = self.tag_pieces(norm) if norm else []
            if pieces:
                out.append((j, tag, pieces))
        return out

    def build(self, samples, batch, ctx) -> None:
        b, t, p = len(samples), self.max_tags, self.pieces
        ids = torch.zeros(b, t, p, dtype=torch.long)
        mask = torch.zeros(b, t, p, dtype=torch.long)
        for i, s in enumerate(samples):
            if s.tags is None and not ctx.allow_missing:
                raise DataError(f"sample {s.id}: no tags, but the model reads the image as tags "
                                "(model.image_encoder.name=tags; give the post a tags list)")
            for j, _, pieces in self.read(s.tags):
                ids[i, j, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
                mask[i, j, : len(pieces)] = 1
        if ctx.allow_missing:
            batch["image_present"] = torch.tensor([bool(s.tags) for s in samples])
        if ctx.wants("tag_ids"):
            batch["tag_ids"] = ids
        batch["tag_mask"] = mask

    def state(self) -> dict[str, Any]:
        return {"max_tags": self.max_tags, "pieces": self.pieces, "buckets": self.buckets}

    def files(self) -> list[str]:
        return [self.directory] if self.tokenizer is not None else []

    def save(self, directory: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory / self.directory))

    @classmethod
    def load(cls, spec, state, directory) -> TagsInput:
        tok = None
        if spec.options.get("embedding", "learned") != "learned":
            from transformers import AutoTokenizer

            path = directory / cls.directory
            if not path.is_dir():
                raise ModelFileError(f"{path}/: missing (this model embeds its tags with a tokenizer)")
            tok = _load_tokenizer_dir(path, lambda d: AutoTokenizer.from_pretrained(str(d)))
        return cls(spec, state["max_tags"], state["pieces"], state["buckets"], tok)

    def fingerprint(self) -> dict[str, Any]:
        return {**self.state(), "embedding": self.embedding, "tokenizer": tokenizer_fingerprint(self.tokenizer)}

    def graph_inputs(self) -> list[GraphInput]:
        return [(k, "int64", ["batch", self.max_tags, self.pieces]) for k in self.keys()]

    def example(self, batch_size, length, g) -> dict[str, torch.Tensor]:
        high = len(self.tokenizer) if self.tokenizer is not None else self.buckets
        ids = torch.randint(1, high, (batch_size, self.max_tags, self.pieces), generator=g)
        tags = random_lengths(batch_size, self.max_tags, 0, g)
        pieces = random_lengths(batch_size * self.max_tags, self.pieces, 1, g).view(batch_size, self.max_tags)
        mask = ((torch.arange(self.max_tags)[None, :, None] < tags[:, None, None])
                & (torch.arange(self.pieces)[None, None] < pieces[..., None])).long()
        return {"tag_ids": ids * mask, "tag_mask": mask}
