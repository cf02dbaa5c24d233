"""TumEmo (Yang et al. 2020): Tumblr image-text posts, 7 emotions.

Two layouts are read:

* ``mgnns``: the JSON-lines files of MGNNS, ``{train,val,test}_all_anno.json``, one object per line with
  ``id``, ``text`` (lower-cased, stop words removed), ``image`` (a path relative to the root), ``label`` (an
  emotion name), ``places`` and ``objects`` (scene and object class ids detected in the image, kept in
  ``extra``); ``label.json`` maps the 7 emotions to ids and fixes the label order.
* ``raw``: the original release, ``all_data_id_and_label.txt`` (a header, then ``<id> <Emotion>``),
  ``data/<id>.txt`` and ``data/<id>.jpg``. Splits come from the MGNNS files' ids when they sit beside it, else a
  seeded stratified 8:1:1 split (logged: it is not the MGNNS split).

A copy without some split (e.g. only val and test) loads the splits it has.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmsenti.config import DataConfig
from mmsenti.data.base import DataError, DatasetBundle, Sample
from mmsenti.data.formats.bundle import finish, require_root
from mmsenti.data.formats.images import ImageFolder, apply_image_policy, attach_images
from mmsenti.data.formats.labels import label_index
from mmsenti.data.formats.readers import read_jsonl, read_text_file, text_lines
from mmsenti.data.splits import carve_split, random_splits, split_by_id_lists
from mmsenti.registry import DATASETS

log = logging.getLogger(__name__)

# label.json of the release: {"angry": 0, "bored": 1, "calm": 2, "fear": 3, "happy": 4, "love": 5, "sad": 6}
DEFAULT_LABELS = ["angry", "bored", "calm", "fear", "happy", "love", "sad"]
_MGNNS = {"train": "train_all_anno.json", "dev": "val_all_anno.json", "test": "test_all_anno.json"}


@dataclass
class TumEmoConfig(DataConfig):
    name: str = "tumemo"
    format: Literal["auto", "mgnns", "raw"] = "auto"  # auto: raw when all_data_id_and_label.txt exists
    image_dir: str | None = None  # default: the json "image" paths (mgnns) or data/ (raw)
    seed: int = 0  # raw layout without MGNNS files: seed of the stratified 8:1:1 split; also of the carve below
    # A copy with val and test but no train file (the release here): train and dev are carved from val, stratified
    # by label, this fraction of it becoming dev (seeded by `seed`); 0 leaves the splits as they are.
    carve_dev: float = 0.15
    # Detected image content as the posts' tags (Sample.tags, read by the tags image encoder): any of "places"
    # (scene class ids, as place<id>) and "objects" (object class ids, as object<id>, repeats dropped). The release
    # has no id -> name maps, so they are opaque ids.
    tags: list[str] = field(default_factory=list)


def read_label_order(root: Path) -> list[str]:
    path = root / "label.json"
    if not path.is_file():
        return list(DEFAULT_LABELS)
    try:
        mapping = json.loads("".join(text_lines(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(len(mapping))):
        raise DataError(f"{path}: expected {{emotion: id}} with ids 0..K-1")
    return [k for k, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def _load_mgnns(root: Path, labels: list[str], encoding: str = "utf-8") -> tuple[dict[str, list[Sample]], list[Path]]:
    splits, sources = {}, []
    for split, fname in _MGNNS.items():
        path = root / fname
        if not path.is_file():
            continue
        sources.append(path)
        samples = []
        for lineno, obj in read_jsonl(path, encoding):
            where = f"{path}:{lineno}"
            if "id" not in obj or "label" not in obj:
                raise DataError(f"{where}: expected keys id, text, image, label")
            samples.append(Sample(
                id=str(obj["id"]), label=label_index(obj["label"], labels, where), text=str(obj.get("text") or ""),
                extra={"image_file": obj.get("image"), "places": obj.get("places", []),
                       "objects": obj.get("objects", [])},
            ))
        splits[split] = samples
    if not splits:
        raise DataError(f"{root}: no TumEmo data found (expected {', '.join(_MGNNS.values())} or the original "
                        f"release with all_data_id_and_label.txt and data/)")
    missing = [k for k in _MGNNS if k not in splits]
    if missing:
        log.warning("tumemo: %s has no %s split (%s)", root, " or ".join(missing),
                    ", ".join(_MGNNS[k] for k in missing))
    return splits, sources


def _load_raw(root: Path, labels: list[str], seed: int, encoding: str) -> tuple[dict[str, list[Sample]], list[Path]]:
    index = root / "all_data_id_and_label.txt"
    data = root / "data"
    samples = []
    with contextlib.closing(text_lines(index, encoding)) as lines:
        for lineno, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or (lineno == 1 and not fields[0].isdigit()):
                continue
            if len(fields) != 2:
                raise DataError(f"{index}:{lineno}: expected '<id> <Emotion>', got {line.strip()!r}")
            pid, emotion = fields
            txt = data / f"{pid}.txt"
            if not txt.is_file():
                raise DataError(f"{index}:{lineno}: post {pid} has no text file {txt}")
            samples.append(Sample(id=pid, label=label_index(emotion, labels, f"{index}:{lineno}"),
                                  text=read_text_file(txt, encoding).strip()))
    lists = {k: [str(o["id"]) for _, o in read_jsonl(root / f, encoding)] for k, f in _MGNNS.items() if (root / f).is_file()}
    if lists:
        splits = split_by_id_lists(samples, lists, "tumemo")
    else:
        log.warning("tumemo: no MGNNS split files in %s; using a seeded stratified 8:1:1 split (seed %d)", root, seed)
        splits = random_splits(samples, seed)
    return splits, [index]


@DATASETS.register("tumemo", config=TumEmoConfig,
                   description="TumEmo Tumblr posts (image+text, 7 emotions): MGNNS json lines or original release")
def build_tumemo(cfg: TumEmoConfig, *, lenient: bool = False) -> DatasetBundle:
    root = require_root(cfg)
    labels = read_label_order(root)
    fmt = cfg.format
    if fmt == "auto":
        fmt = "raw" if (root / "all_data_id_and_label.txt").is_file() else "mgnns"
    if fmt == "raw":
        splits, sources = _load_raw(root, labels, cfg.seed, cfg.encoding)
        modalities = attach_images(splits, root, cfg.image_dir, ("data",), cfg, lenient=lenient)
    elif cfg.image_dir:
        splits, sources = _load_mgnns(root, labels, cfg.encoding)
        modalities = attach_images(splits, root, cfg.image_dir, (), cfg, lenient=lenient)
    else:
        splits, sources = _load_mgnns(root, labels, cfg.encoding)
        modalities = _attach_listed_images(splits, root, cfg, lenient)
    if cfg.tags:
        modalities += (_attach_tags(splits, cfg.tags),)
    if "train" not in splits and "dev" in splits and cfg.carve_dev > 0:
        splits["train"], splits["dev"] = carve_split(splits["dev"], cfg.carve_dev, cfg.seed)
        log.info("tumemo: no train split; train and dev carved from val (%d/%d, stratified, seed %d)",
                 len(splits["train"]), len(splits["dev"]), cfg.seed)
    return finish(cfg.name, splits, "classification", labels, modalities, sources, lenient=lenient)


TAG_KINDS = {"places": "place", "objects": "object"}


def _attach_tags(splits: dict[str, list[Sample]], kinds: list[str]) -> str:
    unknown = [k for k in kinds if k not in TAG_KINDS]
    if unknown:
        raise DataError(f"data.tags: unknown {', '.join(unknown)} (tumemo has: {', '.join(TAG_KINDS)})")
    for samples in splits.values():
        for s in samples:
            tags: list[str] = []
            for kind in kinds:
                ids = s.extra.get(kind) or []
                if not isinstance(ids, list):
                    raise DataError(f"tumemo post {s.id}: '{kind}' must be a list of ids, got {type(ids).__name__}")
                tags += [f"{TAG_KINDS[kind]}{i}" for i in dict.fromkeys(ids)]  # repeats dropped, order kept
            s.tags = tags
    return "tags"


def _attach_listed_images(splits: dict[str, list[Sample]], root: Path, cfg: TumEmoConfig,
                          lenient: bool) -> tuple[str, ...]:
    """MGNNS json names each image by a path relative to the root; the copy has images when those folders exist."""
    folders: dict[Path, ImageFolder | None] = {}
    found_any = False
    for samples in splits.values():
        for s in samples:
            rel = s.extra.get("image_file")
            if not rel:
                continue
            parent = (root / rel).parent
            if parent not in folders:
                folders[parent] = ImageFolder(parent) if parent.is_dir() else None
            found_any = found_any or folders[parent] is not None
    if not found_any:
        return ("text",)
    for samples in splits.values():
        for s in samples:
            rel = s.extra.get("image_file")
            folder = folders.get((root / rel).parent) if rel else None
            s.image = folder.find(Path(rel).name) if folder and rel else None
    splits.update(apply_image_policy(splits, cfg, root, lenient=lenient))
    return ("text", "image")
