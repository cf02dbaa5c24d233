"""The preprocessing an encoder's config implies: its tokenizer (a word-piece vocabulary learned on the training
texts for from-scratch encoders), its image transform, and a CLIP prior's own tokenizer and transform.

The input builders (:mod:`mmsenti.data.inputs`) make these when a processor is created from a model config; the
processor then saves them, so prediction tokenizes and transforms exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from mmsenti.backbones.transforms import ImageTransform
from mmsenti.config import ImageEncoderConfig, TextEncoderConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CLIP_MAX_LENGTH = 77  # CLIP's text context unless its preset says otherwise


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


# ---------------------------------------------------------------------------------------------------- text
def is_tiny_text(cfg: TextEncoderConfig) -> bool:
    return cfg.name == "tiny-bert"


def text_max_length(cfg: TextEncoderConfig) -> int:
    if cfg.max_length is not None:
        return cfg.max_length
    if is_tiny_text(cfg):
        return 40
    from mmsenti.backbones import text_preset

    return text_preset(cfg.name).max_length


def build_tokenizer(cfg: TextEncoderConfig, train_texts: Sequence[str]):
    """The tokenizer of a text encoder; from-scratch (and randomly initialised presets without tokenizer files)
    learn a word-piece vocabulary on ``train_texts``."""
    max_length = text_max_length(cfg)
    if not is_tiny_text(cfg):
        from mmsenti.backbones import load_tokenizer
        from mmsenti.backbones.weights import MissingWeightsError

        try:
            tok = load_tokenizer(cfg.name, cfg.pretrained or True, config_key="model.text_encoder.pretrained")
        except MissingWeightsError:
            if cfg.pretrained:
                raise
            tok = None  # random init and no files: learn a vocabulary like tiny-bert
        if tok is not None:
            tok.model_max_length = max_length
            return tok
    return train_wordpiece_tokenizer(train_texts, cfg.vocab_size, max_length)


# --------------------------------------------------------------------------------------------------- images
def image_transform(cfg: ImageEncoderConfig) -> ImageTransform:
    """The image preprocessing of ``cfg``: the preset's, with the config's explicit size/mean/std on top."""
    if cfg.name == "small-cnn":
        t = ImageTransform(size=64)
    else:
        from mmsenti.backbones import image_preset

        t = image_preset(cfg.name).preprocessing.transform()
    over = {k: v for k, v in (("size", cfg.image_size), ("mean", cfg.mean), ("std", cfg.std)) if v is not None}
    return replace(t, **{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in over.items()})


# ----------------------------------------------------------------------------------------------------- CLIP
def clip_preprocessing(clip: Any, tokenizer) -> tuple[Any, ImageTransform]:
    """(ClipTokenizer, ImageTransform) of a CLIP prior's config ``clip`` (INFIG's ``model.clip``: name,
    pretrained, arch, image_size); ``tokenizer`` is the main text tokenizer, whose ids a random stand-in reads (see
    ``infig.build_clip`` for which ids each CLIP reads)."""
    from mmsenti.backbones.clip import HFClipTokenizer, OpenClipTokenizer
    from mmsenti.backbones.presets import CLIP_MEAN, CLIP_STD

    if clip.name == "tiny-random":  # a random stand-in reads the main tokenizer's ids
        return HFClipTokenizer(tokenizer, CLIP_MAX_LENGTH), ImageTransform(
            size=clip.image_size, mean=list(CLIP_MEAN), std=list(CLIP_STD), resize="shorter",
            interpolation="bicubic")
    from mmsenti.backbones import clip_preprocessing as preset_preprocessing
    from mmsenti.backbones import clip_preset

    preset = clip_preset(clip.name)
    if preset.impl == "open_clip":  # its tokenizer ships with open_clip: the same with or without weights
        context = (clip.arch.get("text_cfg") or {}).get("context_length", preset.max_length)
        _, transform = preset_preprocessing(clip.name, False)
        image_size = (clip.arch.get("vision_cfg") or {}).get("image_size")
        if image_size:  # a custom (e.g. tiny random) architecture reads its own image size
            transform = replace(transform, size=int(image_size))
        return OpenClipTokenizer.from_name(preset.model_id, int(context)), transform
    clip_tok, transform = preset_preprocessing(clip.name, clip.pretrained, config_key="model.clip.pretrained")
    if not clip.pretrained:
        clip_tok = tokenizer  # a random stand-in has no tokenizer of its own (see infig.build_clip)
    return HFClipTokenizer(clip_tok, preset.max_length or CLIP_MAX_LENGTH), transform
