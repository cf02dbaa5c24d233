"""Turn samples into model inputs: tokenizer + image transform + collate, saved with every trained model."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmsenti.backbones.transforms import ImageTransform
from mmsenti.config import TEXT_KEYS, default_batch_inputs
from mmsenti.data.base import Sample
from mmsenti.errors import DataError, ModelFileError
from mmsenti.utils import read_json

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int):
    """Learn a lower-cased word-piece vocabulary on ``texts``; returns a ``PreTrainedTokenizerFast``.

    The vocabulary is the special tokens, every character seen (as ``c`` and ``##c``, so no word is ever
    unknown) and the most frequent whole words up to ``vocab_size``, ties broken alphabetically. Unlike the
    `tokenizers` WordPiece trainer, whose merge ties fall differently from run to run, the same texts always
    give the same ids: runs are reproducible and resume exactly. The result behaves like a BERT tokenizer
    ([CLS] text [SEP], [PAD] = 0) and saves/loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    budget = max(0, vocab_size - len(vocab))
    taken = set(vocab)
    vocab += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if w not in taken][:budget]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length,
    )


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


CLIP_TEXT_KEYS = ("clip_input_ids", "clip_attention_mask")


class Processor:
    """Collate samples into a batch dict: ``input_ids``/``attention_mask``, ``pixel_values``, ``labels``, ``ids``.

    It builds only the keys the model declared (``inputs``: ``{"train": [...], "eval": [...]}``, from the model
    config's ``batch_inputs``): a training batch may carry inputs that only the training losses read (INFIG's
    CLIP inputs), an evaluation / prediction batch never does. Keys it knows how to build: ``input_ids`` +
    ``attention_mask`` (the tokenizer), ``pixel_values`` (the image transform), ``clip_input_ids`` +
    ``clip_attention_mask`` and ``clip_pixel_values`` (the CLIP tokenizer and transform), ``<m>_features`` +
    ``<m>_mask`` (``Sample.features[m]`` sequences).

    A sample's ``image`` may be a path, a PIL image, or the already transformed ``pixel_values`` of that sample
    (a (3, H, W) tensor, from :meth:`image_tensor` in a DataLoader worker or a service's decoding thread).
    With ``allow_missing`` a sample may lack its text or image: it gets an empty text / a zero image and the batch
    says which are real in ``text_present`` / ``image_present`` ((B,) bool), for models that can mask a modality.
    """

    def __init__(self, modalities: Sequence[str], tokenizer=None, max_length: int = 40,
                 image_transform: ImageTransform | None = None, task: str = "classification",
                 clip_tokenizer=None, clip_transform: ImageTransform | None = None, clip_max_length: int = 77,
                 feature_modalities: Sequence[str] = (), inputs: dict[str, Sequence[str]] | None = None):
        self.modalities = list(modalities)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_transform = image_transform
        self.task = task
        # A CLIP prior reads its own tokenization and image preprocessing (INFIG's GAM, training only).
        if clip_tokenizer is not None and not hasattr(clip_tokenizer, "save"):  # a bare HF tokenizer
            from mmsenti.backbones.clip import HFClipTokenizer

            clip_tokenizer = HFClipTokenizer(clip_tokenizer, clip_max_length)
        self.clip_tokenizer = clip_tokenizer
        self.clip_transform = clip_transform
        self.clip_max_length = clip_max_length
        if inputs is None:  # preprocessing saved before models declared their inputs
            keys = default_batch_inputs(self.modalities) + [k for m in feature_modalities
                                                            for k in (f"{m}_features", f"{m}_mask")]
            clip = ([*CLIP_TEXT_KEYS] if clip_tokenizer is not None else []) + (
                ["clip_pixel_values"] if clip_transform is not None else [])
            inputs = {"train": keys + clip, "eval": keys}
        self.inputs = {mode: list(inputs[mode]) for mode in ("train", "eval")}
        self.allow_missing = False
        # Modalities read from ``Sample.features`` as (T, D) sequences (MMSA audio/vision, or text features).
        self.feature_modalities = [k[: -len("_features")] for k in self.inputs["train"] if k.endswith("_features")]
        needs = set(self.inputs["train"]) | set(self.inputs["eval"])
        for keys, what, have in ((TEXT_KEYS, "a tokenizer", tokenizer), (("pixel_values",), "an image transform",
                                 image_transform), (CLIP_TEXT_KEYS, "a CLIP tokenizer", clip_tokenizer),
                                 (("clip_pixel_values",), "a CLIP image transform", clip_transform)):
            if needs & set(keys) and have is None:
                raise ValueError(f"inputs {sorted(needs & set(keys))} need {what}")

    def keys(self, training: bool = True) -> list[str]:
        """The batch keys built for training (default, a superset) or for evaluation/prediction."""
        return self.inputs["train" if training else "eval"]

    @property
    def reads_images(self) -> bool:
        return any(k in self.inputs[mode] for mode in ("train", "eval") for k in ("pixel_values", "clip_pixel_values"))

    def image_tensor(self, image: Any, sample_id: str = "?") -> torch.Tensor:
        """One sample's ``pixel_values`` (3, H, W): decode (a path or PIL image) + transform."""
        return self.image_transform(open_image(image, sample_id))

    def __call__(self, samples: Sequence[Sample], load_images: bool = True, training: bool = True) -> dict[str, Any]:
        """The batch dict.

        Args:
            load_images: False skips reading images (their features come from the frozen-feature cache).
            training: build the training inputs (default) or only those evaluation and prediction read.
        """
        keys = set(self.keys(training))
        batch: dict[str, Any] = {"ids": [s.id for s in samples]}
        if "input_ids" in keys:
            texts = [s.text if s.text is not None else "" for s in samples]
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            batch["input_ids"] = enc["input_ids"]
            batch["attention_mask"] = enc["attention_mask"]
            if self.allow_missing:
                batch["text_present"] = torch.tensor([s.text is not None for s in samples])
        want_clip_pixels = "clip_pixel_values" in keys
        if load_images and ("pixel_values" in keys or want_clip_pixels):
            self._images(samples, batch, "pixel_values" in keys, want_clip_pixels)
        for m in self.feature_modalities:
            if f"{m}_features" in keys:
                batch[f"{m}_features"], batch[f"{m}_mask"] = collate_sequences(samples, m)
        if "clip_input_ids" in keys:
            enc = self.clip_tokenizer([s.text or "" for s in samples])
            batch["clip_input_ids"] = enc["input_ids"]
            batch["clip_attention_mask"] = enc["attention_mask"]
        labels = [s.label for s in samples]
        if all(lab is not None for lab in labels):
            dtype = torch.long if self.task == "classification" else torch.float32
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch

    def _images(self, samples: Sequence[Sample], batch: dict[str, Any], pixels: bool, clip: bool) -> None:
        present = [s.image is not None for s in samples]
        if self.allow_missing:
            batch["image_present"] = torch.tensor(present)
        pix, clip_pix = [], []
        for s, here in zip(samples, present, strict=True):
            if isinstance(s.image, torch.Tensor):  # already decoded and transformed
                if clip:
                    raise DataError(f"sample {s.id}: CLIP inputs need the image itself, not its pixel values")
                pix.append(s.image)
                continue
            if not here and self.allow_missing:
                size = self.image_transform.size
                pix.append(torch.zeros(3, size, size))  # masked out by the model (image_present)
                continue
            im = open_image(s.image, s.id)
            if pixels:
                pix.append(self.image_transform(im))
            if clip:
                clip_pix.append(self.clip_transform(im))
        if pixels:
            batch["pixel_values"] = torch.stack(pix)
        if clip:
            batch["clip_pixel_values"] = torch.stack(clip_pix)

    def for_inference(self) -> Processor:
        """A copy that builds (and saves) only the evaluation inputs: no CLIP tokenizer or transform."""
        eval_keys = self.inputs["eval"]
        clip = any(k.startswith("clip_") for k in eval_keys)
        return Processor(self.modalities, self.tokenizer, self.max_length, self.image_transform, self.task,
                         self.clip_tokenizer if clip else None, self.clip_transform if clip else None,
                         self.clip_max_length, inputs={"train": eval_keys, "eval": eval_keys})

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"modalities": self.modalities, "max_length": self.max_length, "task": self.task,
                "image_transform": asdict(self.image_transform) if self.image_transform else None,
                "clip_transform": asdict(self.clip_transform) if self.clip_transform else None,
                "clip_max_length": self.clip_max_length, "feature_modalities": self.feature_modalities,
                "inputs": self.inputs}
        (directory / "preprocessing.json").write_text(json.dumps(meta, indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        if self.clip_tokenizer is not None:
            self.clip_tokenizer.save(directory / "clip_tokenizer")

    @classmethod
    def load(cls, directory: str | Path) -> Processor:
        from transformers import AutoTokenizer

        from mmsenti.backbones.clip import ClipTokenizer

        directory = Path(directory)
        path = directory / "preprocessing.json"
        if not path.is_file():
            raise ModelFileError(f"not a saved mmsenti model: {path} is missing")
        meta = read_json(path, "preprocessing description")
        if not isinstance(meta, dict) or not isinstance(meta.get("modalities"), list):
            raise ModelFileError(f"{path}: expected an object with 'modalities'")
        inputs = meta.get("inputs")
        reads_tokens = ("input_ids" in inputs.get("train", []) + inputs.get("eval", []) if isinstance(inputs, dict)
                        else "text" in meta["modalities"] and "text" not in meta.get("feature_modalities", ()))
        if reads_tokens and not (directory / "tokenizer").is_dir():
            raise ModelFileError(f"{directory / 'tokenizer'}/: missing (this model reads text; the folder is incomplete)")

        def loaded(name: str, load):
            if not (directory / name).is_dir():
                return None
            try:
                return load(directory / name)
            except Exception as e:  # noqa: BLE001 - transformers raises many types for a damaged tokenizer folder
                raise ModelFileError(f"{directory / name}/: cannot load the tokenizer ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}); the folder is damaged") from None

        tok = loaded("tokenizer", lambda d: AutoTokenizer.from_pretrained(str(d)))
        clip_max_length = meta.get("clip_max_length", 77)
        clip_tok = loaded("clip_tokenizer", lambda d: ClipTokenizer.load(d, clip_max_length))

        def transform(key: str) -> ImageTransform | None:
            return ImageTransform(**meta[key]) if meta.get(key) else None

        return cls(meta["modalities"], tok, meta["max_length"], transform("image_transform"),
                   meta.get("task", "classification"), clip_tok, transform("clip_transform"), clip_max_length,
                   meta.get("feature_modalities", ()), inputs=meta.get("inputs"))
