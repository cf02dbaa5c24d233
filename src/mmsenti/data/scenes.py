"""``scenes`` ("polarity scenes"): a built-in image+text dataset whose label needs both modalities.

Each post is written the day before an outing: the text says which weather the writer **hopes** for and which
one they **dread** (three kinds: sun, rain, snow). The image shows the weather that actually came. The
sentiment is

* positive when the image shows the hoped-for weather,
* negative when it shows the dreaded weather,
* neutral when it shows the third kind.

The (hope, dread) pair is one of the 6 ordered pairs of distinct kinds and the weather shown is uniform over
the 3 kinds, independently. So the label is uniform given the text alone and uniform given the image alone:
any unimodal model is at chance (1/3) in expectation, while the pair of modalities determines the label
exactly. Texts vary templates, word order, outings and filler words; images vary background, position, scale,
colours and clutter, so neither side is a lookup table.

Everything is generated deterministically from ``seed`` (no files are shipped); images are rendered with PIL.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

from mmsenti.config import DataConfig
from mmsenti.data.base import DatasetBundle, Sample
from mmsenti.registry import DATASETS

LABELS = ["negative", "neutral", "positive"]
KINDS = ["sun", "rain", "snow"]

# Hoped-for and dreaded weather are phrased differently (as people do: one hopes for "sunny skies" and dreads
# "a scorcher"), so the two roles are readable from words, not only from word order.
_HOPE_WORDS = {
    "sun": ["sunny skies", "a sunny day", "sunshine", "clear blue skies"],
    "rain": ["a rainy day", "gentle showers", "some rain", "a cosy drizzle"],
    "snow": ["a snowy day", "fresh snowfall", "snowy slopes", "a white landscape"],
}
_DREAD_WORDS = {
    "sun": ["the heat", "a scorcher", "blazing sun", "a heatwave"],
    "rain": ["a downpour", "pouring rain", "a soaking", "a washout"],
    "snow": ["a blizzard", "icy snow", "snowdrifts", "a snowstorm"],
}
_OUTINGS = [
    "the picnic", "the hike", "our wedding", "the match", "the road trip", "the festival", "the ski trip",
    "the barbecue", "my birthday", "the parade", "the camping weekend", "the garden party", "the race",
]
_HOPE = [
    "really hoping for {h} for {o}", "fingers crossed for {h} at {o}", "all I want for {o} is {h}",
    "praying for {h} during {o}", "wishing for {h} on the day of {o}", "{h} would make {o} perfect",
]
_DREAD = [
    "please, not {d}", "anything but {d}", "dreading {d}", "{d} would ruin it", "terrified of {d}",
    "I can't stand {d}",
]
_JOIN = ["{a}, {b}", "{a} - {b}", "{a}. {b}", "{b}! {a}", "{b}, {a}"]
_FILLER = ["", "", " tomorrow", " honestly", " lol", " #weekend", " :)", " fingers crossed", " so excited"]


def make_text(hope: str, dread: str, rng: random.Random) -> str:
    outing = rng.choice(_OUTINGS)
    a = rng.choice(_HOPE).format(h=rng.choice(_HOPE_WORDS[hope]), o=outing)
    b = rng.choice(_DREAD).format(d=rng.choice(_DREAD_WORDS[dread]))
    text = rng.choice(_JOIN).format(a=a, b=b) + rng.choice(_FILLER)
    return text[0].upper() + text[1:]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 25) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _cloud(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, colour, rng: random.Random) -> None:
    for dx, dy, s in ((-0.9, 0.1, 0.7), (0.0, -0.3, 0.95), (0.9, 0.1, 0.7), (0.35, 0.25, 0.7), (-0.4, 0.25, 0.7)):
        rr = r * s * rng.uniform(0.9, 1.1)
        x, y = cx + dx * r, cy + dy * r
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=colour)


def render_scene(kind: str, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw one weather scene: sun (disc with rays), rain (cloud with streaks), snow (cloud with flakes)."""
    s = 4 * size  # draw large then downsample: antialiased shapes
    sky = {"sun": (120, 180, 235), "rain": (110, 120, 135), "snow": (150, 160, 175)}[kind]
    # Backgrounds overlap between kinds so colour alone is a weak cue.
    sky = _jitter(sky, rng, 45)
    img = Image.new("RGB", (s, s), sky)
    draw = ImageDraw.Draw(img)
    ground_y = s * rng.uniform(0.72, 0.88)
    ground = _jitter((90, 140, 70) if kind != "snow" else (225, 225, 230), rng, 30)
    draw.rectangle([0, ground_y, s, s], fill=ground)
    for _ in range(rng.randint(0, 3)):  # clutter: trees/houses on the ground line
        x = rng.uniform(0, s)
        w = rng.uniform(0.05, 0.12) * s
        draw.rectangle([x, ground_y - w * 1.2, x + w, ground_y], fill=_jitter((110, 80, 60), rng, 40))
    cx, cy = s * rng.uniform(0.3, 0.7), s * rng.uniform(0.25, 0.45)
    r = s * rng.uniform(0.13, 0.2)
    if kind == "sun":
        colour = _jitter((250, 210, 40), rng, 20)
        n_rays = rng.randint(7, 12)
        phase = rng.uniform(0, 6.283)
        for i in range(n_rays):
            a = phase + 6.283 * i / n_rays
            draw.line([cx + 1.2 * r * math.cos(a), cy + 1.2 * r * math.sin(a),
                       cx + 1.8 * r * math.cos(a), cy + 1.8 * r * math.sin(a)], fill=colour, width=max(2, s // 40))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        _cloud(draw, cx, cy, r, _jitter((200, 200, 205) if kind == "rain" else (235, 235, 240), rng, 20), rng)
        for _ in range(rng.randint(8, 14)):
            x = cx + rng.uniform(-1.6, 1.6) * r
            y = cy + r * rng.uniform(0.8, 2.6)
            if kind == "rain":  # slanted blue streaks
                draw.line([x, y, x - 0.15 * r, y + 0.5 * r], fill=_jitter((40, 80, 220), rng, 25), width=max(2, s // 50))
            else:  # white six-armed flakes
                f = r * 0.18
                c = _jitter((250, 250, 255), rng, 5)
                draw.line([x - f, y, x + f, y], fill=c, width=max(2, s // 60))
                draw.line([x - f / 2, y - f, x + f / 2, y + f], fill=c, width=max(2, s // 60))
                draw.line([x + f / 2, y - f, x - f / 2, y + f], fill=c, width=max(2, s // 60))
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return img


def label_for(hope: str, dread: str, shown: str) -> int:
    if shown == hope:
        return LABELS.index("positive")
    if shown == dread:
        return LABELS.index("negative")
    return LABELS.index("neutral")


# Tags an image tagger might give a scene: one or two words of the weather shown among unrelated ones.
_TAG_WORDS = {
    "sun": ["sun", "sunny", "bright", "clear sky", "warm"],
    "rain": ["rain", "umbrella", "wet", "grey clouds", "puddle"],
    "snow": ["snow", "snowflake", "white", "cold", "winter"],
}
_OTHER_TAGS = ["tree", "house", "person", "street", "field", "hill", "car", "fence", "bird", "road"]


def make_tags(shown: str, rng: random.Random) -> list[str]:
    """2-6 tags of a scene showing ``shown``: 1-2 of its weather's words, the rest unrelated, shuffled."""
    tags = rng.sample(_TAG_WORDS[shown], rng.randint(1, 2)) + rng.sample(_OTHER_TAGS, rng.randint(1, 4))
    rng.shuffle(tags)
    return tags


def make_sample(index: int, split: str, seed: int, image_size: int = 64, tags: bool = False) -> Sample:
    # One RNG per sample: a sample does not change when the split size changes.
    rng = random.Random(f"scenes/{seed}/{split}/{index}")
    hope, dread = rng.sample(KINDS, 2)
    shown = rng.choice(KINDS)
    sample = Sample(
        id=f"{split}-{index:06d}",
        label=label_for(hope, dread, shown),
        text=make_text(hope, dread, rng),
        image=render_scene(shown, rng, image_size),
        extra={"hope": hope, "dread": dread, "shown": shown},
    )
    if tags:  # drawn after everything else, so the texts and images are those of the dataset without tags
        sample.tags = make_tags(shown, rng)
    return sample


@dataclass
class ScenesConfig(DataConfig):
    num_train: int = 3000
    num_dev: int = 600
    num_test: int = 600
    seed: int = 0  # the data's own seed, independent of the training seed
    image_size: int = 64  # rendered size; models resize to their own input size
    tags: bool = False  # also tag each image with words of what it shows (for the tags image encoder)


@DATASETS.register("scenes", config=ScenesConfig, description="built-in polarity scenes: label needs text + image")
def build_scenes(cfg: ScenesConfig, *, lenient: bool = False) -> DatasetBundle:
    # Generated: nothing for `lenient` to keep (no file can be missing, no id repeats).
    sizes = {"train": cfg.num_train, "dev": cfg.num_dev, "test": cfg.num_test}
    splits = {name: [make_sample(i, name, cfg.seed, cfg.image_size, cfg.tags) for i in range(n)]
              for name, n in sizes.items()}
    return DatasetBundle(name="scenes", splits=splits, task="classification", label_names=list(LABELS),
                         modalities=("text", "image", "tags") if cfg.tags else ("text", "image"))
