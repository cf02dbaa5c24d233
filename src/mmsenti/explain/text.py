"""Word pieces back into words: the rows of every word-level explanation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmsenti.explain.results import Word


def words_of(tokenizer, text: str, max_length: int, input_ids: Sequence[int] | None = None) -> list[Word]:
    """The words of ``text`` as the model read it, each with the positions of its word pieces.

    A word is what the tokenizer's pre-tokenizer splits off (for BERT-style tokenizers: runs of letters/digits,
    each punctuation mark on its own), glued back where a reader sees one word (``can't``, ``well-known``,
    ``#weekend``); all its pieces make one :class:`Word`. Special tokens ([CLS], [SEP], ...)
    and padding are never words. Words cut off by truncation at ``max_length`` are not read, so not listed.

    Args:
        tokenizer: the model's (fast) tokenizer; slow tokenizers fall back to the ``##`` / ``▁`` piece markers.
        input_ids: the ids the model was given (checked against this tokenization).
    """
    enc = tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True,
                    return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
    ids = list(enc["input_ids"])
    if input_ids is not None:
        given = [int(i) for i in input_ids]
        given = given[: len(ids)] if all(i == tokenizer.pad_token_id for i in given[len(ids):]) else given
        if given != ids:
            raise ValueError("the text's tokenization differs from the model input it is meant to explain")
    special = enc["special_tokens_mask"]
    if getattr(tokenizer, "is_fast", False):
        words: dict[int, Word] = {}
        for pos, (wid, (start, end)) in enumerate(zip(enc.word_ids(), enc["offset_mapping"], strict=True)):
            if wid is None or special[pos]:
                continue
            if wid in words:
                w = words[wid]
                w.tokens.append(pos)
                w.start, w.end = min(w.start, start), max(w.end, end)
            else:
                words[wid] = Word(text="", start=start, end=end, tokens=[pos])
        out = list(words.values())
        for w in out:  # SentencePiece offsets may start at the space before the word
            while w.start < w.end and text[w.start].isspace():
                w.start += 1
        return _glue(out, text)
    return _words_from_markers(tokenizer, ids, special)


GLUE_INSIDE = set("'’-_.&")  # joins two word parts written without a space: can't, well-known, e.g
GLUE_BEFORE = set("#@$")  # starts a word written without a space: #weekend, @user, $5


def _glue(words: list[Word], text: str) -> list[Word]:
    """Pre-tokenizers split at every punctuation mark; glue back what a reader takes as one word: ``can't``,
    ``well-known`` (a mark between two parts with no space), ``#weekend``, ``@user`` (a mark before a part)."""
    out: list[Word] = []
    i = 0
    while i < len(words):
        w = Word(text="", start=words[i].start, end=words[i].end, tokens=list(words[i].tokens))
        i += 1
        while i < len(words):
            nxt, mark = words[i], text[w.start:w.end]
            after = i + 1 < len(words) and words[i + 1].start == nxt.end and _alnum(text, words[i + 1])
            if nxt.start != w.end:  # a space in between
                break
            if len(mark) == 1 and mark in GLUE_BEFORE and _alnum(text, nxt):
                pass  # '#' + 'weekend'
            elif text[nxt.start:nxt.end] in GLUE_INSIDE and _alnum(text, w) and after:
                w.end, w.tokens = nxt.end, w.tokens + nxt.tokens  # 'can' + "'" (+ 't' below)
                i += 1
                nxt = words[i]
            else:
                break
            w.end, w.tokens = nxt.end, w.tokens + nxt.tokens
            i += 1
        w.text = text[w.start:w.end]
        out.append(w)
    return out


def _alnum(text: str, w: Word) -> bool:
    return any(c.isalnum() for c in text[w.start:w.end])


def _words_from_markers(tokenizer, ids: list[int], special: list[int]) -> list[Word]:
    """Slow tokenizers (no offsets): ``##x`` continues a word (WordPiece), ``▁x`` starts one (SentencePiece)."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    sentencepiece = any(p.startswith("▁") for p in pieces)
    words: list[Word] = []
    prev_special = True
    for pos, (piece, sp) in enumerate(zip(pieces, special, strict=True)):
        if sp:
            prev_special = True
            continue
        cont = piece.startswith("##") if not sentencepiece else not piece.startswith("▁")
        if cont and words and not prev_special:
            words[-1].tokens.append(pos)
            words[-1].text += piece[2:] if not sentencepiece else piece
        else:
            words.append(Word(text=piece.lstrip("▁"), start=-1, end=-1, tokens=[pos]))
        prev_special = False
    return words


def pool_words(values: np.ndarray, words: Sequence[Word], how: str = "sum", offset: int = 0) -> np.ndarray:
    """Per-token values (axis 0 indexed by input position − ``offset``) → per-word values.

    ``sum`` for additive quantities (attributions, pooling weights: a word weighs what its pieces weigh together);
    ``mean`` for distributions over something else (a word's map over the regions: the average of its pieces').
    """
    if how not in ("sum", "mean"):
        raise ValueError(f"how must be 'sum' or 'mean', got {how!r}")
    values = np.asarray(values)
    rows = [values[[t - offset for t in w.tokens]] for w in words]
    if not rows:
        return np.zeros((0, *values.shape[1:]), dtype=values.dtype)
    return np.stack([r.sum(0) if how == "sum" else r.mean(0) for r in rows])


def is_content_word(word: str) -> bool:
    """Has a letter or digit: punctuation is never among the default words of a figure."""
    return any(c.isalnum() for c in word)
