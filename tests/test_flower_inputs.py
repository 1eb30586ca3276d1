"""The Flower app without a federation: run and node settings refuse bad input with one line, resume refusals
across runtimes, the wire format of tensors (bit for bit, and bad records rejected), and a node process that
imports no model library before it needs one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedlora.config import dump_config, load_config


def test_settings_reject_bad_input_with_one_clear_line():
    from fedlora.errors import ConfigError
    from fedlora.flower.settings import NodeSettings, RunSettings

    with pytest.raises(ConfigError, match="unknown key 'round_timeout'.*did you mean 'round-timeout'"):
        RunSettings.from_run_config({"round_timeout": 5})
    with pytest.raises(ConfigError, match="'round-timeout': 0.0 must be > 0"):
        RunSettings.from_run_config({"round-timeout": 0})
    with pytest.raises(ConfigError, match="'min-replies': expected int"):
        RunSettings.from_run_config({"min-replies": "two"})
    with pytest.raises(ConfigError, match="'set': cannot split"):
        RunSettings(set="rounds='2").overrides()
    assert RunSettings(set="rounds=2 'data.path=/a b.jsonl'").overrides() == ["rounds=2", "data.path=/a b.jsonl"]
    with pytest.raises(ConfigError, match="'resume' and 'overwrite' contradict"):
        RunSettings.from_run_config({"resume": True, "overwrite": "true"})
    with pytest.raises(ConfigError, match="'force' only applies with 'resume=true'"):
        RunSettings.from_run_config({"force": True})
    with pytest.raises(ConfigError, match="give 'partition-id'"):
        NodeSettings.from_node_config({"num-partitions": 3})
    with pytest.raises(ConfigError, match="unknown key 'data_path'.*did you mean 'data-path'"):
        NodeSettings.from_node_config({"partition-id": 0, "data_path": "x"})
    cfg_yaml = dump_config(load_config(None, ["clients=3"]))
    with pytest.raises(ConfigError, match="'partition-id': 3 is out of range"):
        NodeSettings.from_node_config({"partition-id": 3}).config(cfg_yaml)
    with pytest.raises(ConfigError, match="'num-partitions': 4, but the run has federation.clients=3"):
        NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 4}).config(cfg_yaml)
    node = NodeSettings.from_node_config({"partition-id": 1, "data-path": "/data/dolly.jsonl", "threads": 2})
    cfg = node.config(cfg_yaml)
    assert (cfg.data.path, cfg.model.threads, node.partition_id) == ("/data/dolly.jsonl", 2, 1)


def test_simulate_command_bad_config_is_one_line(capsys):
    from fedlora.cli import main

    assert main(["flower", "simulate", "--set", "rounds=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: federation.rounds: 0 must be > 0"]


def test_resume_refusals_across_runtimes_are_one_line(capsys, tmp_path):
    """A missing run dir for `flower simulate --resume`; a Flower checkpoint given to `fedlora run --resume`."""
    from fedlora.checkpoint import CheckpointStore
    from fedlora.cli import main

    assert main(["flower", "simulate", "--resume", "--out", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --resume: {tmp_path / 'nowhere'} does not exist"]

    run = tmp_path / "flower-run"
    run.mkdir()
    cfg_yaml = dump_config(load_config(None, []))
    (run / "config.yaml").write_text(cfg_yaml)
    CheckpointStore(run).save(1, {"runtime": "flower", "server": {}}, [], cfg_yaml, "fp", 0.0)
    before = sorted(str(p) for p in run.rglob("*"))
    assert main(["run", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was written by the Flower ServerApp; resume it there" in err[0]
    assert sorted(str(p) for p in run.rglob("*")) == before


def test_transport_keeps_values_and_dtypes():
    """A message's tensors travel as ONE uint8 array plus a layout, and come back bit for bit, bfloat16 too."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedlora.errors import UpdateRejected
    from fedlora.flower import messages as M

    state = {"a": torch.randn(3, 2), "b": torch.randn(4).to(torch.bfloat16), "c": torch.tensor(7),
             "d": torch.randn(2, 3).t(), "e": torch.zeros(0, 4), "f": torch.tensor([-0.0, float("nan")])}
    record = M.to_record(state)
    assert set(record.keys()) == {M.PACKED, M.LAYOUT} and record[M.PACKED].numpy().dtype == np.uint8
    assert record[M.PACKED].numpy().size == sum(v.numel() * v.element_size() for v in state.values())  # b: 2 bytes
    assert M.names(record) == list(state)
    back = M.from_record(record, state)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)), k
    assert M.from_record(M.to_record({}), state) == {} and M.names(M.to_record({})) == []

    # a bad or incomplete record from the wire: one line, UpdateRejected (the round goes on without the reply)
    packed, layout = record[M.PACKED].numpy(), record[M.LAYOUT].numpy().tobytes()
    short = ArrayRecord({M.PACKED: Array(packed[:-1]), M.LAYOUT: record[M.LAYOUT]})
    no_layout = ArrayRecord({M.PACKED: record[M.PACKED]})
    garbled = ArrayRecord({M.PACKED: record[M.PACKED], M.LAYOUT: Array(np.frombuffer(layout[:-3], np.uint8))})
    unpacked = ArrayRecord({"a": Array(state["a"].numpy())})  # the old one-array-per-tensor format
    lying = ArrayRecord({M.PACKED: record[M.PACKED], M.LAYOUT: Array(np.frombuffer(
        layout.replace(b'"float32",[3,2]', b'"float32",[3,3]'), np.uint8))})
    for bad, words in [(short, "layout covers"), (no_layout, "expected"), (garbled, "malformed tensor record"),
                       (unpacked, "expected"), (lying, "bad layout entry")]:
        for read in (M.names, lambda r: M.from_record(r, {})):
            with pytest.raises(UpdateRejected, match=words) as e:
                read(bad)
            assert "\n" not in str(e.value)


def test_a_node_process_imports_no_model_library_before_it_needs_a_model():
    """The setup query (data only) and the ClientApp module need no torch/transformers/peft/nltk: a fresh
    ClientApp process pays for them only when it builds a model; ROUGE's nltk only when it scores."""
    code = ("import sys; import fedlora.flower.client_app, fedlora.flower.workspace, fedlora.data.sources; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'rouge_score', 'nltk') if m in sys.modules]; "
            "import fedlora.evaluate; heavy += [m for m in ('rouge_score', 'nltk') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
