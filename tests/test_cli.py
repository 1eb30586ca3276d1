"""Bad input ends with one clear line and a non-zero exit; nothing already written is lost."""

import json

import pytest
from conftest import DOLLY

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import ConfigError


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


BAD_CONFIGS = [
    ("federation:\n  rounds: 0\n", "federation.rounds"),
    ("federation:\n  rouns: 3\n", "did you mean 'rounds'"),
    ("method: fedavg_lora\n", "unknown method"),
    ("train:\n  lr: fast\n", "train.lr: expected a number"),
    ("data:\n  partition: random\n", "data.partition"),
    ("federation: [1, 2]\n", "federation: expected a mapping"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout"),
    ("method_options:\n  lr_mult:\n    C.mag: 2\n", "unknown component"),
    ("a: [\n", "not valid YAML"),
    ("data:\n  field_map:\n    question: q\n", "data.field_map"),
]


@pytest.mark.parametrize("text,needle", BAD_CONFIGS)
def test_bad_config_is_one_line(tmp_path, capsys, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, out, err = run_cli(capsys, "run", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,needle", [
    ("roundz=2", "did you mean"), ("batch_size=2", "ambiguous"), ("rounds", "expected KEY=VALUE"),
    ("federation.clients=-1", "federation.clients"), ("model.device=tpu", "model.device"),
])
def test_bad_override_is_one_line(tmp_path, capsys, override, needle):
    code, _, err = run_cli(capsys, "run", "--set", override, "--out", str(tmp_path / "r"))
    assert code == 2 and needle in err and err.count("\n") == 1


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in err


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    code, _, err = run_cli(capsys, "run", "--out", str(run), "--set", f"data.path={DOLLY}")
    assert code == 2 and "already holds a run" in err
    assert (run / "results.json").read_text() == "{}"


def test_set_shortcuts_and_dict_fields():
    cfg = load_config(None, ["rounds=5", "federation.clients=8", "method_options.lr_mult.B.mag=10",
                             "lora.target_modules=[q_proj]"])
    assert cfg.federation.rounds == 5 and cfg.federation.clients == 8
    assert cfg.method_options.lr_mult == {"B.mag": 10.0}
    assert cfg.lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError):
        load_config(None, ["lora.r=0"])


BAD_DATA = [
    (None, "data file not found"),
    ("", "data file is empty"),
    ("{not json}\n", "no usable rows"),
    ('{"question": "a", "answer": "b"}\n', "field 'instruction' is missing"),
    ('{"instruction": 1, "response": "b"}\n', "field 'instruction' is int"),
    ('[{"instruction": "a"', "not valid JSON"),
    ('{"instruction": "a", "response": "b", "category": "x"}\n' * 3, "clients=10 but only"),
]


@pytest.mark.parametrize("content,needle", BAD_DATA)
def test_data_errors_are_one_line_and_write_nothing(tmp_path, capsys, content, needle):
    p = tmp_path / "d.jsonl"
    if content is not None:
        p.write_text(content)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "run", "--out", str(out), "--set", f"data.path={p}", "--set", "clients=10",
                           "--set", "global_test_per_label=0")
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_data_directory_instead_of_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--out", str(tmp_path / "r"), "--set", f"data.path={tmp_path}")
    assert code == 2 and "is a directory" in err


def test_unknown_model_offline(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--out", str(tmp_path / "r"), "--set", "model.name=nobody/no-such-model",
                           "--set", f"data.path={DOLLY}")
    assert code == 2 and "cannot load tokenizer for model 'nobody/no-such-model'" in err
    assert err.count("\n") == 1


def test_methods_lists_every_method(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    for name in ("fedlora_opt", "fedit", "fedprox", "ffa", "fedsa", "feddpa", "feddora", "fedit_ft", "local_only",
                 "centralized"):
        assert name in out
