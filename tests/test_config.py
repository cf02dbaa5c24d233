from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmsenti.config import ConfigError, load_config, merge, parse_override
from mmsenti.data.scenes import ScenesConfig
from mmsenti.models.baselines import LateFusionConfig, TextOnlyConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_typed_dataclasses():
    cfg = load_config()
    assert isinstance(cfg.data, ScenesConfig) and isinstance(cfg.model, LateFusionConfig)
    assert cfg.model.modalities == ["text", "image"] and cfg.optim.lr == 1e-3


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  epochs: 3\n  lr: 2.0e-4\nmodel:\n  dropout: 0.3\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nmodel:\n  name: text-only\noptim:\n  lr: 1e-4\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.epochs=5", "model.text_encoder.width=64", "run.seed=7"])
    assert isinstance(cfg.model, TextOnlyConfig) and cfg.model.modalities == ["text"]
    assert cfg.model.dropout == 0.3  # from the base, kept through the child's model section
    assert cfg.optim.lr == 1e-4  # child wins over base; "1e-4" (no dot) still reads as a float
    assert cfg.optim.epochs == 5  # --set wins over files
    assert cfg.model.text_encoder.width == 64 and cfg.run.seed == 7


def test_repository_configs_load():
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").rglob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.nope=1"], "unknown config key 'model.nope'"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
        (["data.num_train=1.5"], "data.num_train: expected an integer"),
        (["run.quiet=maybe"], "run.quiet: expected true/false"),
        (["run.precision=fp8"], "run.precision: expected one of"),
        (["model.name=nope"], "model.name: unknown model 'nope'"),
        (["data.name=nope"], "data.name: unknown dataset 'nope'"),
        (["model.text_encoder.width=[1]"], "model.text_encoder.width: expected an integer"),
        (["bogus.key=1"], "unknown config key 'bogus'"),
        (["novalue"], "expected key=value"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, overrides)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text("_base_: cyc.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cyc)


def test_merge_and_parse_override():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_override("run.out=runs/x") == {"run": {"out": "runs/x"}}


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmsenti", "train", "--set", "optim.lr=fast", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "mmsenti: error: optim.lr: expected a number, got 'fast'"
    r = subprocess.run([sys.executable, "-m", "mmsenti", "train", "--config", str(tmp_path / "x.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr


def test_resolved_config_round_trips_through_json(tmp_path):
    from mmsenti.config import config_from_json, save_config

    cfg = load_config(None, ["model.name=text-only", "optim.lr=3e-4", "data.num_train=10"])
    save_config(cfg, tmp_path / "c.json")
    back = config_from_json(tmp_path / "c.json")
    assert back == cfg
    assert json.loads((tmp_path / "c.json").read_text())["model"]["name"] == "text-only"


def test_a_variant_name_is_its_model_with_the_variants_settings_under_the_configs_own(tmp_path):
    """`model.name: infig-tiny` in a file or a --set: infig with the variant's settings, under the file's and the
    --set's own; the saved config names infig and reads back without the variant; resuming with the variant's name
    is no change."""
    from mmsenti.config import config_from_json, resume_config, save_config
    from mmsenti.models.infig.model import InfigConfig
    from mmsenti.registry import MODELS

    (tmp_path / "base.yaml").write_text("model:\n  name: infig\n  fusion_layers: 2\n")
    (tmp_path / "tiny.yaml").write_text("_base_: base.yaml\nmodel:\n  name: infig-tiny\n  text_encoder:\n"
                                        "    num_layers: 2\n")
    cfg = load_config(tmp_path / "tiny.yaml", ["model.width=48", "model.text_encoder.num_heads=4"])
    tiny = MODELS.resolve("infig-tiny")[1]
    assert isinstance(cfg.model, InfigConfig) and cfg.model.name == "infig"
    assert cfg.model.image_layers == tiny["image_layers"] and cfg.model.queue_size == tiny["queue_size"]
    assert cfg.model.text_encoder.width == tiny["text_encoder"]["width"]  # the variant's, under a partial section
    assert (cfg.model.fusion_layers, cfg.model.text_encoder.num_layers) == (2, 2)  # the files' own
    assert (cfg.model.width, cfg.model.text_encoder.num_heads) == (48, 4)  # --set's
    assert cfg.model.use_gam and cfg.model.hfam_layers == tiny["hfam_layers"]  # the model's and the variant's
    save_config(cfg, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "infig"
    assert config_from_json(tmp_path / "config.json") == cfg
    assert resume_config(cfg, overrides=["model.name=infig-tiny", "model.width=48", "model.fusion_layers=2",
                                         "model.text_encoder.num_layers=2", "model.text_encoder.num_heads=4"])[1] == {}
    # The same settings spelled out on the model are the same config.
    assert load_config(None, ["model.name=late-fusion-tiny"]) == load_config(None, [
        "model.name=late-fusion", *(f"model.{k}={v}" for k, v in MODELS.resolve("late-fusion-tiny")[1].items())])


def test_an_unknown_model_name_lists_the_models_and_their_variants():
    with pytest.raises(ConfigError, match=r"^model.name: unknown model 'infig-small' \(known: .*infig, infig-tiny,"):
        load_config(None, ["model.name=infig-small"])


def test_resume_config_accepts_only_what_cannot_change_the_training(tmp_path):
    from mmsenti.config import RESUME_OVERRIDES, resume_config

    saved = load_config(ROOT / "configs" / "quickstart.yaml", ["run.seed=3"])
    same, changes = resume_config(saved, overrides=["run.seed=3", "run.threads=2", "run.quiet=true"])
    assert changes == {"run.threads": (0, 2), "run.quiet": (False, True)} and same.run.threads == 2
    # --config: the same command as the run's start is no change at all.
    assert resume_config(saved, load_config(ROOT / "configs" / "quickstart.yaml", ["run.seed=3"]))[1] == {}
    for item, key in (("run.seed=4", "run.seed"), ("model.name=text-only", "model.name"),
                      ("data.batch_size=7", "data.batch_size")):
        with pytest.raises(ConfigError, match=rf"^--resume cannot change {key} ") as e:
            resume_config(saved, overrides=[item, "data.root=/elsewhere"])
        assert "\n" not in str(e.value) and all(k in str(e.value) for k in RESUME_OVERRIDES)
