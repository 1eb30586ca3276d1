"""The config package: renamed keys (old name works, with one notice; both names refused) and per-section checks."""

from __future__ import annotations

import dataclasses

import pytest

from fedlora.cli import main
from fedlora.config import (
    RENAMED,
    Config,
    DataConfig,
    EvalConfig,
    FederationConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    rename_notice,
)
from fedlora.config.schema import PrivacyConfig
from fedlora.errors import ConfigError

NOTICE = ("note: train.local_steps is deprecated; it is train.global_steps "
          "(the global phase's steps per client-round)\n")


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_rename_table_and_notice():
    assert RENAMED["train.local_steps"][0] == "train.global_steps"
    assert rename_notice("train.local_steps") + "\n" == NOTICE


def test_old_key_in_yaml(tmp_path, capsys):
    cfg = load_config(_yaml(tmp_path, "train:\n  local_steps: 4\n"))
    assert cfg.train.global_steps == 4
    assert capsys.readouterr().err == NOTICE


@pytest.mark.parametrize("key", ["train.local_steps", "local_steps"])
def test_old_key_in_set(capsys, key):
    cfg = load_config(None, [f"{key}=4"])
    assert cfg.train.global_steps == 4
    assert capsys.readouterr().err == NOTICE


def test_notice_once_per_load(tmp_path, capsys):
    cfg = load_config(_yaml(tmp_path, "train: {local_steps: 4}\n"), ["local_steps=6", "train.local_steps=7"])
    assert cfg.train.global_steps == 7
    assert capsys.readouterr().err == NOTICE
    load_config(None, ["local_steps=3"])  # a second load tells again, once
    assert capsys.readouterr().err == NOTICE


def test_new_key_has_no_notice(tmp_path, capsys):
    assert load_config(_yaml(tmp_path, "train: {global_steps: 4}\n"), ["global_steps=5"]).train.global_steps == 5
    assert capsys.readouterr().err == ""


def test_set_overrides_the_file_under_either_name(tmp_path, capsys):
    assert load_config(_yaml(tmp_path, "train: {global_steps: 4}\n"), ["local_steps=6"]).train.global_steps == 6
    assert load_config(_yaml(tmp_path, "train: {local_steps: 4}\n"), ["global_steps=6"]).train.global_steps == 6
    assert capsys.readouterr().err == NOTICE * 2


def test_both_in_yaml_refused(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        load_config(_yaml(tmp_path, "train:\n  local_steps: 4\n  global_steps: 5\n"))
    msg = str(e.value)
    assert "\n" not in msg and "both train.local_steps and train.global_steps" in msg and "c.yaml" in msg
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("sets", [["local_steps=4", "global_steps=5"], ["train.global_steps=5", "train.local_steps=4"]])
def test_both_in_set_refused(capsys, sets):
    with pytest.raises(ConfigError, match=r"^--set: both train.local_steps and train.global_steps are given") as e:
        load_config(None, sets)
    assert "\n" not in str(e.value)
    assert capsys.readouterr().err == ""


def test_both_refused_by_the_cli_in_one_line(tmp_path, capsys):
    code = main(["run", "--set", "local_steps=4", "--set", "global_steps=5", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "train.global_steps" in err
    assert not (tmp_path / "r").exists()


def test_no_notice_when_the_config_is_bad(tmp_path, capsys):
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config(_yaml(tmp_path, "train: {local_steps: 4}\nfederation: {rounds: 0}\n"))
    assert capsys.readouterr().err == ""


def test_config_from_dict_renames_without_touching_its_input(capsys):
    tree = {"train": {"local_steps": 3}}
    assert config_from_dict(tree).train.global_steps == 3
    assert tree == {"train": {"local_steps": 3}}
    assert capsys.readouterr().err == NOTICE
    with pytest.raises(ConfigError, match="both train.local_steps and train.global_steps"):
        config_from_dict({"train": {"local_steps": 3, "global_steps": 4}})


SECTION_CASES = [
    (ModelConfig(threads=0), "model.threads: 0 must be > 0"),
    (DataConfig(test_fraction=1.0), "data.test_fraction: 1.0 must be in (0, 1)"),
    (DataConfig(max_length=8), "data.max_length: 8 must be >= 16"),
    (DataConfig(field_map={"instruction": "q"}), "data.field_map: missing the 'response' entry"),
    (LoraConfig(r=0), "lora.r: 0 must be > 0"),
    (LoraConfig(dropout=1.0), "lora.dropout: 1.0 must be in [0, 1)"),
    (FederationConfig(fraction=0.0), "federation.fraction: 0.0 must be in (0, 1]"),
    (FederationConfig(server_beta2=1.0), "federation.server_beta2: 1.0 must be in [0, 1)"),
    (FederationConfig(max_norm_ratio=0.5), "federation.max_norm_ratio: 0.5 must be > 1"),
    (TrainConfig(global_steps=0), "train.global_steps: 0 must be > 0"),
    (TrainConfig(personal_steps=-1), "train.personal_steps: -1 must be >= 0"),
    (MethodConfig(local_lr_mult=0.0), "method_options.local_lr_mult: 0.0 must be > 0"),
    (MethodConfig(lr_mult={"C.mag": 2.0}), "method_options.lr_mult: unknown component 'C.mag'"),
    (MethodConfig(lr_mult={"A.mag": -1.0}), "method_options.lr_mult.A.mag: -1.0 must be > 0"),
    (EvalConfig(max_new_tokens=0), "eval.max_new_tokens: 0 must be > 0"),
    (OutputConfig(checkpoint_every=-1), "output.checkpoint_every: -1 must be >= 0"),
]


@pytest.mark.parametrize("section,needle", SECTION_CASES, ids=[n.split(":")[0] for _, n in SECTION_CASES])
def test_section_validates_its_own_fields(section, needle):
    type(section)().validate()  # the defaults pass
    with pytest.raises(ConfigError) as e:
        section.validate()
    assert str(e.value).startswith(needle) and "\n" not in str(e.value)


def test_every_section_is_checked_by_config():
    cfg = Config()
    assert {type(s) for s in cfg.sections()} == {ModelConfig, DataConfig, LoraConfig, FederationConfig, TrainConfig,
                                                 MethodConfig, EvalConfig, OutputConfig, PrivacyConfig}
    cfg.validate()
    with pytest.raises(ConfigError, match="^train.batch_size: 0 must be > 0"):
        dataclasses.replace(cfg, train=TrainConfig(batch_size=0)).validate()


def test_cross_section_rule_is_configs():
    cfg = Config(eval=EvalConfig(split="validation"))
    cfg.eval.validate()
    cfg.data.validate()  # each section alone is fine; together they are not
    with pytest.raises(ConfigError, match="eval.split: 'validation' needs data.validation_fraction > 0"):
        cfg.validate()
