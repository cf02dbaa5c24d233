"""Clips whose features ``mmsenti features extract`` wrote: ``data.name: features``, ``data.root`` = its ``--out``.

Labels, splits and texts are read from the folder's ``clips.jsonl`` exactly as the ``jsonl`` dataset reads a user's
file (``task``, ``label_names``, ``dev_fraction``/``test_fraction`` carving, text checks), and each clip gets its
audio/vision sequences from ``features.npz``. The bundle carries the manifest's extraction settings: a model trained
on it records them (``model.extraction``) and extracts a new clip the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmsenti.data.base import DataError, DatasetBundle
from mmsenti.data.formats.bundle import require_root
from mmsenti.data.formats.mmsa import load_feature_npz
from mmsenti.data.formats.user import UserDataConfig, build_user
from mmsenti.data.video.job import FEATURES, RECORDS, read_manifest
from mmsenti.registry import DATASETS


@dataclass
class FeaturesDataConfig(UserDataConfig):
    name: str = "features"


@DATASETS.register("features", config=FeaturesDataConfig,
                   description="clips turned into audio/vision features by `mmsenti features extract` (root = its "
                               "--out folder)")
def build_features(cfg: FeaturesDataConfig, *, lenient: bool = False) -> DatasetBundle:
    root = require_root(cfg)
    if not root.is_dir():
        raise DataError(f"data.root {root}: expected the folder `mmsenti features extract --out` wrote")
    manifest = read_manifest(root)
    if not manifest.get("complete"):
        raise DataError(f"{root}: the extraction did not finish (run `mmsenti features extract` again with the same "
                        "--out: it resumes)")
    records = dataclasses.replace(cfg, root=str(root / RECORDS), id_field="id", split_field="split",
                                  text_field="text", label_field="label")
    bundle = build_user(records, (".jsonl",), lenient=lenient)
    dims = manifest["dims"]
    arrays = load_feature_npz(root / FEATURES)
    sequences: dict[str, dict[str, object]] = {}
    for part in arrays.values():
        for i, sid in enumerate(part["id"]):
            sequences[str(sid)] = {m: part[m][i, : int(part[f"{m}_lengths"][i])] for m in dims}
    for samples in bundle.splits.values():
        for s in samples:
            if s.id not in sequences:
                raise DataError(f"{root / FEATURES}: no features for clip {s.id!r} ({RECORDS} lists it)")
            s.features = sequences[s.id]
    bundle.modalities = (*bundle.modalities, *dims)
    bundle.sources.append(root / FEATURES)
    bundle.extraction = manifest["extraction"]
    bundle.feature_dims = {m: int(d) for m, d in dims.items()}
    return bundle
