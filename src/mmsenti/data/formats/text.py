"""Tweet text normalisation: user mentions, URLs, hashtags, HTML entities and emoji.

The HFM release (Cai et al. 2019) ships texts already normalised: ``@name`` → ``<user>``, links → ``<url>``,
``#tag`` → ``# tag``, emoji → opaque ``emoji_N`` tokens. The CLMLF json of MVSA holds the raw tweet text, which
CLMLF tokenises as is. :func:`normalize_tweet` maps raw tweets to the same conventions as HFM, so models see
both sources alike; it is idempotent, so running it over HFM text changes nothing. Emoji become their Unicode
names (``:face_with_tears_of_joy:``), which a word-piece tokenizer can split into meaningful pieces, unlike an
index into a vocabulary we do not have. See ``docs/datasets.md``.
"""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Literal

USER_TOKEN = "<user>"
URL_TOKEN = "<url>"

# Links, including those Twitter truncated at the end of a post ("... http:/", "... https").
_URL = re.compile(r"\bhttps?:/*\S*|\bwww\.\S+|\bhttps?$", re.IGNORECASE)
_USER = re.compile(r"(?<![\w@])@\w+")
_HASH = re.compile(r"(?<![\w#&])#(?=\w)")
_SPACES = re.compile(r"\s+")

# Code points read as emoji. Modifiers are dropped: skin tones, variation selectors, zero-width joiner
# (a joined sequence becomes its named parts) and the keycap mark.
_EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2300, 0x23FF), (0x2B00, 0x2BFF), (0x3030, 0x303D))
_MODIFIERS = {0xFE0E, 0xFE0F, 0x200D, 0x20E3, *range(0x1F3FB, 0x1F400)}
_REGIONAL = (0x1F1E6, 0x1F1FF)  # two regional indicator letters spell a flag


def is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _EMOJI_RANGES)


def _emoji_name(ch: str) -> str:
    name = unicodedata.name(ch, "").lower()
    return f":{'_'.join(name.split())}:" if name else ":emoji:"


def _replace_emoji(text: str, mode: Literal["name", "keep", "remove"]) -> str:
    out: list[str] = []
    chars = list(text)
    i = 0
    while i < len(chars):
        cp = ord(chars[i])
        if cp in _MODIFIERS:
            i += 1
            continue
        nxt = ord(chars[i + 1]) if i + 1 < len(chars) else 0
        if _REGIONAL[0] <= cp <= _REGIONAL[1] and _REGIONAL[0] <= nxt <= _REGIONAL[1]:
            code = chr(cp - _REGIONAL[0] + ord("a")) + chr(nxt - _REGIONAL[0] + ord("a"))
            out.append(f" :flag_{code}: " if mode == "name" else " ")
            i += 2
            continue
        if is_emoji(chars[i]):
            out.append(f" {_emoji_name(chars[i])} " if mode == "name" else " ")
        else:
            out.append(chars[i])
        i += 1
    return "".join(out)


def normalize_tweet(text: str, *, users: bool = True, urls: bool = True,
                    hashtags: Literal["split", "keep", "strip"] = "split",
                    emoji: Literal["name", "keep", "remove"] = "name", unescape: bool = True) -> str:
    """Normalise a social-media post the way the HFM release is normalised.

    Args:
        text: the raw post.
        users: replace ``@name`` mentions by ``<user>`` (names are noise and identify people).
        urls: replace links by ``<url>``; links truncated by Twitter at the end of a post count too.
        hashtags: ``split`` turns ``#tag`` into ``# tag`` (HFM), so the word is read as a word;
            ``strip`` drops the ``#``; ``keep`` leaves hashtags alone.
        emoji: ``name`` replaces each emoji by its Unicode name (``:red_heart:``), ``remove`` deletes it,
            ``keep`` leaves it (modifiers are dropped in every mode but ``keep``).
        unescape: decode HTML entities (``&amp;`` → ``&``), which Twitter dumps keep.

    Returns:
        The text with single spaces and no leading/trailing blanks. Case is kept (tokenizers decide).
    """
    if unescape:
        text = html.unescape(text)
    if urls:
        text = _URL.sub(f" {URL_TOKEN} ", text)
    if users:
        text = _USER.sub(USER_TOKEN, text)
    if hashtags == "split":
        text = _HASH.sub("# ", text)
    elif hashtags == "strip":
        text = _HASH.sub("", text)
    if emoji != "keep":
        text = _replace_emoji(text, emoji)
    return _SPACES.sub(" ", text).strip()
