"""CM-Off-Meme (LREC-COLING 2024): Hindi-English code-mixed memes, valence as 3 classes.

Layout: ``train.csv`` and ``dev.csv`` (``Name,Text,Valence,Sarcasm,Level1,Level2,Joy,Sadness,Anger,Fear,
Surprise``) and ``images/<Name>``. ``Text`` is the meme's OCR text; ``Valence`` the label. The other columns go
into ``extra`` (``sarcasm``, ``offensive``, ``offensive_level``, ``emotions``).

Splits: the official test set is not public, so the official dev set (150 memes) is our **test** split, and
our **dev** split (model selection) is carved from the official train set: a deterministic stratified
``dev_fraction`` (default 0.15: 129 memes) chosen by ``seed``; the remaining 729 are train. Published numbers
"on cm_memes dev" are therefore numbers on our test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmsenti.config import DataConfig
from mmsenti.data.base import DataError, DatasetBundle, Sample
from mmsenti.data.formats.bundle import finish, require_root
from mmsenti.data.formats.images import attach_images
from mmsenti.data.formats.labels import label_index
from mmsenti.data.formats.readers import read_csv
from mmsenti.data.splits import carve_split
from mmsenti.registry import DATASETS

LABELS = ["negative", "neutral", "positive"]
EMOTIONS = ("Joy", "Sadness", "Anger", "Fear", "Surprise")


@dataclass
class MemesConfig(DataConfig):
    name: str = "cm-memes"
    image_dir: str | None = None  # relative to root; default images/
    dev_fraction: float = 0.15  # of the official train set, stratified, carved off as our dev split
    seed: int = 0  # seed of that carving (fixed: the data's own seed, not the training seed)


def _read(path: Path, encoding: str = "utf-8") -> list[Sample]:
    samples = []
    for lineno, row in read_csv(path, required=("Name", "Text", "Valence"), encoding=encoding):
        where = f"{path}:{lineno}"
        if not row["Name"].strip():
            raise DataError(f"{where}: empty Name (the image file name, which is also the id)")
        emotions = {}
        for e in EMOTIONS:
            if row.get(e, "").strip():
                try:
                    emotions[e.lower()] = int(row[e])
                except ValueError:
                    raise DataError(f"{where}: {e} must be 0 or 1, got {row[e]!r}") from None
        samples.append(Sample(
            id=row["Name"].strip(), label=label_index(row["Valence"], LABELS, where), text=row["Text"].strip(),
            extra={"sarcasm": row.get("Sarcasm") or None, "offensive": row.get("Level1") or None,
                   "offensive_level": row.get("Level2") or None, "emotions": emotions},
        ))
    return samples


@DATASETS.register("cm-memes", config=MemesConfig,
                   description="CM-Off-Meme code-mixed memes (image+text, valence 3 classes)")
def build_memes(cfg: MemesConfig, *, lenient: bool = False) -> DatasetBundle:
    root = require_root(cfg)
    train_csv, dev_csv = root / "train.csv", root / "dev.csv"
    for p in (train_csv, dev_csv):
        if not p.is_file():
            raise DataError(f"{root}: CM-Off-Meme needs train.csv and dev.csv (missing {p.name})")
    official_train = _read(train_csv, cfg.encoding)
    train, dev = carve_split(official_train, cfg.dev_fraction, cfg.seed)
    splits = {"train": train, "dev": dev, "test": _read(dev_csv, cfg.encoding)}
    modalities = attach_images(splits, root, cfg.image_dir, ("images",), cfg, lenient=lenient)
    return finish(cfg.name, splits, "classification", list(LABELS), modalities, [train_csv, dev_csv], lenient=lenient)
