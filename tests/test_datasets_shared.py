"""The readers on the real data in ../shared/data reproduce the published splits exactly (skipped when absent)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import mmsenti.data.formats  # noqa: F401  (registers the datasets)
from mmsenti.data import doctor
from mmsenti.data.formats.hfm import HFMConfig, build_hfm
from mmsenti.data.formats.memes import MemesConfig, build_memes
from mmsenti.data.formats.mmsa import MMSAConfig, MOSEIConfig, build_mmsa
from mmsenti.data.formats.mvsa import MVSAConfig, MVSAMultipleConfig, build_mvsa
from mmsenti.data.formats.tumemo import TumEmoConfig, build_tumemo

pytestmark = pytest.mark.shared_data


def sizes(bundle) -> tuple[int, ...]:
    return tuple(len(bundle.splits[k]) for k in ("train", "dev", "test"))


def test_mvsa_single(shared_data):
    b = build_mvsa(MVSAConfig(root=str(shared_data / "mvsa_single"), use_translation=True))
    assert sizes(b) == (3611, 450, 450)
    assert b.label_names == ["positive", "neutral", "negative"] and b.modalities == ("text",)
    # json ids 0/1/2 are positive/neutral/negative; the published class counts of the CLMLF split
    assert Counter(s.label for s in b.splits["train"]) == {0: 2147, 1: 376, 2: 1088}
    assert all(s.image is None and s.extra["translation"] for v in b.splits.values() for s in v)


def test_mvsa_multiple(shared_data):
    b = build_mvsa(MVSAMultipleConfig(root=str(shared_data / "mvsa_multiple")))
    assert sizes(b) == (13624, 1700, 1700) and b.name == "mvsa-multiple"
    assert Counter(s.label for s in b.splits["test"]) == {0: 1131, 1: 440, 2: 129}


def test_hfm_json_and_raw_release_agree(shared_data):
    root = shared_data / "hfm"
    js = build_hfm(HFMConfig(root=str(root)))
    assert sizes(js) == (19816, 2410, 2409)
    raw = build_hfm(HFMConfig(root=str(root), format="raw", use_attributes=True, use_translation=True))
    assert sizes(raw) == (19816, 2410, 2409)
    # The filtering rule on the raw release leaves exactly the ids of train.json, in order, with the same labels;
    # valid2/test2's last element is the label of valid.json/test.json.
    for split in ("train", "dev", "test"):
        rows = [(s.id, s.label, s.text) for s in raw.splits[split]]
        assert rows == [(s.id, s.label, s.text) for s in js.splits[split]]
    assert {s.id for s in raw.splits["train"]} == {x["id"] for x in json.loads((root / "train.json").read_text())}
    assert all(len(s.tags) == 5 and s.extra["translation"] for v in raw.splits.values() for s in v)
    unfiltered = build_hfm(HFMConfig(root=str(root), format="raw", filter_train=False))
    assert len(unfiltered.splits["train"]) == 29040


def test_tumemo_val_and_test(shared_data):
    b = build_tumemo(TumEmoConfig(root=str(shared_data / "tumemo"), carve_dev=0))
    assert list(b.splits) == ["dev", "test"]  # the copy here has no train split
    assert len(b.splits["dev"]) == 10035 and len(b.splits["test"]) == 10055
    assert b.label_names == ["angry", "bored", "calm", "fear", "happy", "love", "sad"]
    assert Counter(b.label_names[s.label] for s in b.splits["dev"])["happy"] == 2992
    # The default: train and dev carved 85/15 from val, stratified; every post has tags with places and objects.
    carved = build_tumemo(TumEmoConfig(root=str(shared_data / "tumemo"), tags=["places", "objects"]))
    assert [len(carved.splits[k]) for k in ("train", "dev", "test")] == [8530, 1505, 10055]
    dev = Counter(s.label for s in carved.splits["dev"])
    val = Counter(s.label for s in b.splits["dev"])
    assert all(abs(dev[k] - 0.15 * val[k]) < 1 for k in val)
    assert all(s.tags and s.tags[0].startswith("place") for v in carved.splits.values() for s in v)


@pytest.mark.parametrize("cls, folder, expected", [(MMSAConfig, "mosi", (1281, 229, 685)),
                                                   (MOSEIConfig, "mosei", (16274, 1861, 4653))])
def test_mosi_mosei_label_csv(shared_data, cls, folder, expected):
    b = build_mmsa(cls(root=str(shared_data / folder)))
    assert sizes(b) == expected and b.task == "regression" and b.modalities == ("text",)
    scores = [s.label for v in b.splits.values() for s in v]
    assert min(scores) == -3.0 and max(scores) == 3.0 and all(s.text for v in b.splits.values() for s in v)


def test_cm_memes_splits_and_images(shared_data):
    root = shared_data / "cm_memes"
    b = build_memes(MemesConfig(root=str(root)))
    # Official train (858) → our train + dev (stratified 15%), official dev (150) → our test.
    assert sizes(b) == (729, 129, 150)
    assert len(b.splits["train"]) + len(b.splits["dev"]) == 858
    assert Counter(s.label for s in b.splits["dev"]) == {0: 55, 1: 44, 2: 30}
    assert b.modalities == ("text", "image") and b.label_names == ["negative", "neutral", "positive"]
    report = doctor.check(b)  # header + end-marker check of all 1,008 images (JPEG data under .png names)
    assert report.images_checked == 1008 and not report.has_errors and not report.shared_ids
