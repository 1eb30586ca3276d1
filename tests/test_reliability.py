"""Reliability: exact resume after kill -9, atomic checkpoints (poisoned updates: test_robust.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_cfg
from runkit import metrics_without_wall_time, save_tiny_model, snapshot, write_data

from fedlora.checkpoint import CheckpointStore, is_due
from fedlora.cli import main
from fedlora.config import MethodConfig
from fedlora.core.aggregate import ClientUpdate
from fedlora.core.methods import build_method
from fedlora.core.server import Server
from fedlora.core.server_opt import FedAdam
from fedlora.data.federated import build_federated_data, load_examples
from fedlora.simulation import Simulation

REPO = Path(__file__).resolve().parents[1]
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"

# fedlora_opt (personal B.mag) with FedAdam (server optimizer state) and 2 of 3 clients sampled per round:
# with seed 3 the rounds sample [0, 2], [1, 2], [0, 2], so client 0's personal state must survive round 2.
RUN_CONFIG = """\
method: fedlora_opt
seed: 3
model: {{name: {model}, threads: 1}}
data: {{path: {data}, max_length: 64, global_test_per_label: 2}}
federation: {{clients: 3, rounds: 3, fraction: 0.67, server_optimizer: fedadam, server_lr: 0.01}}
train: {{global_steps: 2, personal_steps: 2, batch_size: 2}}
eval: {{max_examples_per_client: 4, max_global_examples: 8, max_gen_examples: 2, max_new_tokens: 4}}
output: {{plots: false}}
"""


# ----------------------------------------------------------------------------- kill -9 and resume (real CLI)


def _snapshot_source(dest: Path) -> Path:
    """A copy of the package for the test's processes: all of them run the same code even if someone edits
    src/ while the test runs (processes started seconds apart would otherwise import different versions)."""
    shutil.copytree(REPO / "src" / "fedlora", dest / "fedlora", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _cli(cwd: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONPATH": str(cwd / "src")}
    env.pop("FEDLORA_FAULT", None)
    if fault:
        env["FEDLORA_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def test_kill9_at_three_points_then_resume_is_bit_identical(tmp_path, capsys):
    _snapshot_source(tmp_path / "src")
    model = save_tiny_model(tmp_path / "model")
    data = write_data(tmp_path / "data.jsonl")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(RUN_CONFIG.format(model=model, data=data))
    ref, run = tmp_path / "ref", tmp_path / "run"
    ckpts = run / "checkpoints"

    # the uninterrupted reference runs beside the first victim (two processes, two cores)
    p_ref = _cli(tmp_path, "-c", str(cfg), "--out", str(ref))
    p_run = _cli(tmp_path, "-c", str(cfg), "--out", str(run), fault="train@2")

    # kill 1: during round 2's training (after the first sampled client's global phase)
    code, out = _finish(p_run)
    assert code == -signal.SIGKILL, out
    assert sorted(p.name for p in ckpts.iterdir()) == ["round-000001"]
    assert not (run / "results.json").exists()

    # kill 2: resumed, then killed inside round 3's checkpoint write (files written, no manifest, not renamed)
    code, out = _finish(_cli(tmp_path, "--resume", str(run), fault="checkpoint@3"))
    assert code == -signal.SIGKILL, out
    assert "resuming after round 1 of 3" in out
    assert sorted(p.name for p in ckpts.iterdir()) == [".round-000003.tmp", "round-000001", "round-000002"]
    assert not (ckpts / ".round-000003.tmp" / "manifest.json").exists()

    # kill 3: resumed from round 2 (the torn checkpoint is never loaded), killed after round 3's checkpoint
    # is committed, before any result is written
    code, out = _finish(_cli(tmp_path, "--resume", str(run), fault="checkpoint-committed@3"))
    assert code == -signal.SIGKILL, out
    assert "resuming after round 2 of 3" in out
    assert (ckpts / "round-000003" / "manifest.json").is_file() and not (run / "results.json").exists()

    # the last resume only writes the results: every round is done
    code, out = _finish(_cli(tmp_path, "--resume", str(run)))
    assert code == 0, out
    assert "resuming after round 3 of 3" in out and "round 3:" not in out
    code, out_ref = _finish(p_ref)
    assert code == 0, out_ref

    # the same files, every one byte for byte (adapters with their config and model card, personal states, ...)
    # except those that hold wall times, compared without them
    adapters = sorted(p.relative_to(ref) for p in (ref / "adapters").rglob("*.safetensors"))
    assert len(adapters) == 4  # global + clients 0, 1, 2
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file())
    assert {"adapters/global/adapter_config.json", "adapters/global/README.md"} <= {str(f) for f in files}
    for rel in files:
        if _timed(rel):
            assert _without_times(ref / rel) == _without_times(run / rel), rel
        else:
            assert (ref / rel).read_bytes() == (run / rel).read_bytes(), rel
    a = torch.load(ref / "checkpoints/round-000003/state.pt", weights_only=True)
    b = torch.load(ckpts / "round-000003/state.pt", weights_only=True)
    for k, v in a["server"]["global_state"].items():
        assert torch.equal(v, b["server"]["global_state"][k])
    assert sorted(p.name for p in ckpts.iterdir()) == ["round-000002", "round-000003"]  # leftovers pruned
    assert json.loads((run / "results.json").read_text())["provenance"]["resumed"] is True

    # resuming a finished run says so, exits 0 and changes nothing
    before = snapshot(run)
    assert main(["run", "--resume", str(run)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert snapshot(run) == before


# Files that legitimately differ between a resumed run and an uninterrupted one, because they hold wall times (the
# processes took different times) or say the run was resumed; everything else must be the same bytes.
#   metrics.jsonl (and each checkpoint's copy): each round's wall_time and its evaluation's wall_time;
#   results.json: those again in history, the base model's evaluation wall_time, the summary's wall_time, and
#     provenance.wall_time and provenance.resumed;
#   results.md: the "wall s" column (the last);
#   checkpoints/*/manifest.json: elapsed, written (a timestamp), and the hashes and sizes of the timed files;
#   checkpoints/*/state.pt: the base model's evaluation with its wall_time (the resumed run's comes from the
#     killed process that evaluated it), and the open round's wall time so far (`seconds`) and its record's
#     wall_time.
# And config.yaml (and each checkpoint's copy) names the run's own directory (output.dir): compared without it.
TIMED = ("metrics.jsonl", "results.json", "results.md", "manifest.json", "state.pt", "config.yaml")


def _timed(rel: Path) -> bool:
    return rel.name in TIMED


def _untimed(o):
    if isinstance(o, dict):
        return {k: _untimed(v) for k, v in o.items() if k not in ("wall_time", "elapsed", "written", "resumed", "seconds")}
    if isinstance(o, (list, tuple)):
        return [_untimed(v) for v in o]
    if isinstance(o, torch.Tensor):
        return (o.dtype, o.shape, o.tolist())
    return o


def _without_times(path: Path):
    if path.name == "metrics.jsonl":
        return metrics_without_wall_time(path)
    if path.name == "config.yaml":
        config = yaml.safe_load(path.read_text())
        del config["output"]["dir"]
        return config
    if path.name == "results.md":  # drop the last column, "wall s"
        return [line.rsplit("|", 2)[0] for line in path.read_text().splitlines()]
    if path.name == "manifest.json":
        m = json.loads(path.read_text())
        m["files"] = {k: v for k, v in m["files"].items() if k not in TIMED}
        return _untimed(m)
    if path.name == "state.pt":
        return _untimed(torch.load(path, weights_only=True))
    return _untimed(json.loads(path.read_text()))


# ----------------------------------------------------------------------------- checkpoint store


def _save(store, rnd, value=1.0):
    state = {"x": torch.full((3,), float(value)), "n": rnd}
    store.save(rnd, state, [f'{{"round": {r}}}\n' for r in range(1, rnd + 1)], "seed: 0\n", "fp", float(rnd))


def test_checkpoint_roundtrip_keeps_the_newest_two(tmp_path):
    store = CheckpointStore(tmp_path)
    for r in (1, 2, 3):
        _save(store, r, r)
    assert sorted(p.name for p in store.dir.iterdir()) == ["round-000002", "round-000003"]
    ck, skipped = store.latest()
    assert ck.round == 3 and skipped == {} and torch.equal(ck.state["x"], torch.full((3,), 3.0))
    assert ck.metrics == ['{"round": 1}\n', '{"round": 2}\n', '{"round": 3}\n']
    assert ck.config_yaml == "seed: 0\n" and ck.fingerprint == "fp" and ck.elapsed == 3.0


@pytest.mark.parametrize("damage", ["no_manifest", "flipped_byte", "truncated", "bad_manifest", "missing_file"])
def test_a_torn_checkpoint_is_never_loaded(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    _save(store, 1, 1)
    _save(store, 2, 2)
    newest = store.dir / "round-000002"
    if damage == "no_manifest":
        (newest / "manifest.json").unlink()
    elif damage == "flipped_byte":
        data = bytearray((newest / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "state.pt").write_bytes(bytes(data))
    elif damage == "truncated":
        (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:100])
    elif damage == "bad_manifest":
        (newest / "manifest.json").write_text("{torn")
    else:
        (newest / "metrics.jsonl").unlink()
    ck, skipped = store.latest()
    assert ck.round == 1 and torch.equal(ck.state["x"], torch.ones(3))
    assert list(skipped) == ["round-000002"]


def test_temporary_leftovers_are_ignored_then_pruned(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    tmp = store.dir / ".round-000002.tmp"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"partial")
    ck, skipped = store.latest()
    assert ck.round == 1 and skipped == {}
    _save(store, 2)
    assert sorted(p.name for p in store.dir.iterdir()) == ["round-000001", "round-000002"]


def test_checkpoint_schedule():
    assert [r for r in range(1, 8) if is_due(r, 7, 3)] == [3, 6, 7]
    assert [r for r in range(1, 4) if is_due(r, 3, 0)] == [3]
    assert [r for r in range(1, 4) if is_due(r, 3, 1)] == [1, 2, 3]


def test_simulation_state_roundtrip_continues_identically(tok, one_thread):
    """In process: run 1 round, save, build a fresh simulator, load, run round 2 == uninterrupted round 2."""
    from tiny import tiny_model

    def sim_for(cfg):
        examples, unseen = load_examples(cfg, warn=lambda m: None)
        return Simulation(cfg, tok, tiny_model(len(tok)), build_federated_data(cfg, examples, unseen),
                          log=lambda m: None)

    cfg = small_cfg("method=fedsa", "server_optimizer=fedavgm", "fraction=0.67", "eval.every=5",
                    "max_gen_examples=0")
    full = sim_for(cfg)
    full.run()
    half = sim_for(cfg)
    half.run_round(1)
    saved = half.state_dict()
    again = sim_for(cfg)
    again.load_state_dict(saved, list(half.history))
    again.run(start_round=2)
    for k, v in full.server.global_state.items():
        assert torch.equal(v, again.server.global_state[k])
    for c in full.personal:
        for k, v in full.personal[c].items():
            assert torch.equal(v, again.personal[c][k])
    assert [h.train_loss for h in full.history] == [h.train_loss for h in again.history]
    with pytest.raises(ValueError, match="does not fit"):
        bad = dict(saved, server={**saved["server"], "global_state": {
            k: torch.zeros(1) for k in saved["server"]["global_state"]}})
        sim_for(cfg).load_state_dict(bad)


def test_server_state_dict_restores_the_optimizer():
    method = build_method("fedit", MethodConfig())
    init = {KEY_A: torch.zeros(2, 3), KEY_B: torch.zeros(3, 2)}
    ups = [ClientUpdate(0, {KEY_A: torch.ones(2, 3), KEY_B: torch.ones(3, 2)}, 4)]
    one = Server(method, init, FedAdam(lr=0.1), {})
    one.aggregate(ups)
    two = Server(method, init, FedAdam(lr=0.1), {})
    two.load_state_dict(one.state_dict())
    one.aggregate(ups)
    two.aggregate(ups)
    for k in init:
        assert torch.equal(one.global_state[k], two.global_state[k])
    with pytest.raises(ValueError, match="does not fit"):
        two.load_state_dict({"global_state": {KEY_A: torch.zeros(2, 3)}, "optimizer": {}})
