"""The pilot study (`fedlora analyze sensitivity`) on the tiny model: snapshots, measures, report files, bad input."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from fedlora.analysis.pilot import finetune_group, lora_snapshot, run_pilot, write_pilot_report  # noqa: E402
from fedlora.adapters import AdapterModel  # noqa: E402
from fedlora.cli import main  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.data.examples import Example  # noqa: E402
from fedlora.data.prompts import PromptFormatter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DOLLY = SHARED / "databricks-dolly-15k.jsonl"
NI = SHARED / "natural-instructions"
needs_dolly = pytest.mark.skipif(not DOLLY.is_file(), reason="shared Dolly data not present")
needs_ni = pytest.mark.skipif(not (NI / "tasks").is_dir(), reason="shared Natural Instructions data not present")

SMALL = ["max_length=64", "train.batch_size=2", "lora.dropout=0.0", "train.lr=0.001", "model.threads=1"]


def examples(label: str, n: int = 8) -> list[Example]:
    return [Example(f"Say {label}.", f"number {i}", f"{label} {i} {label}", label) for i in range(n)]


def test_snapshots_start_at_zero_b_and_follow_every():
    tok = tiny_tokenizer()
    cfg = load_config(None, SMALL)
    am = AdapterModel(tiny_model(len(tok)), "lora", cfg.lora, seed=0)
    run = finetune_group(am, PromptFormatter(tok, "plain", 64), examples("x"), steps=5, every=2,
                         train_cfg=cfg.train, seed=0)
    assert [s for s, _ in run.snapshots] == [0, 2, 4, 5]
    assert len(run.losses) == 5 and all(math.isfinite(x) for x in run.losses)
    first, last = run.snapshots[0][1], run.snapshots[-1][1]
    b_names = [n for n in first if ".lora_B." in n]
    a_names = [n for n in first if ".lora_A." in n]
    assert b_names and a_names and len(first) == len(b_names) + len(a_names)
    assert all(float(first[n].abs().max()) == 0 for n in b_names)  # LoRA's B starts at zero
    assert all(float(last[n].abs().max()) > 0 for n in b_names)
    assert any(not torch.equal(first[n], last[n]) for n in a_names)
    # snapshots are copies, not views of the live parameters
    assert not any(first[n] is p for n, p in am.params.items())
    assert lora_snapshot(am).keys() == first.keys()


def test_every_group_starts_from_the_same_lora_init(tmp_path):
    tok = tiny_tokenizer()
    cfg = load_config(None, SMALL)
    groups = {"alpha": examples("alpha"), "beta": examples("beta")}
    runs, base = run_pilot(cfg, tok, tiny_model(len(tok)), groups, steps=3, every=1)
    assert [r.group for r in runs] == ["alpha", "beta"]
    a0, b0 = runs[0].snapshots[0][1], runs[1].snapshots[0][1]
    assert all(torch.equal(a0[n], b0[n]) for n in a0)
    assert not any(".lora_" in n for n, _ in base.named_parameters())  # the base model comes back clean
    summary, paths = write_pilot_report(runs, tmp_path)
    assert set(summary["groups"]) == {"alpha", "beta"}
    for axis in ("rows", "cols"):
        overall = summary["overall"][axis]
        assert overall["delta_direction_A"] > 0 and overall["delta_magnitude_B"] > 0
        assert math.isfinite(overall["a_dir_over_b_dir"]) and math.isfinite(overall["b_mag_over_a_mag"])
        # ΔM_B is B's mean vector norm (B starts at zero)
        assert overall["delta_magnitude_B"] == pytest.approx(
            sum(summary["groups"][g]["axes"][axis]["delta_magnitude_B"] for g in groups) / 2)
    assert all(p.exists() for p in paths)


def _argv(tiny_dir, out, *extra):
    return ["analyze", "sensitivity", "--set", f"model.name={tiny_dir}", "--set", f"data.path={DOLLY}",
            *[x for s in SMALL for x in ("--set", s)], "--steps", "4", "--every", "2", "--heldout", "4",
            "--draws", "2", "--out", str(out), *extra]


@needs_dolly
def test_analyze_sensitivity_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pilot"
    code = main(_argv(tiny_dir, out, "--groups", "closed_qa,brainstorming"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "A-dir : B-dir" in captured.out and "loss response" in captured.out
    for name in ("pilot.json", "summary.md", "summary.json", "seed_0/summary.md", "seed_0/summary.json",
                 "seed_0/records.json", "seed_0/sensitivity_all_groups.md", "seed_0/snapshots_closed_qa.pt",
                 "seed_0/run_closed_qa.json", "seed_0/sensitivity_closed_qa.md", "seed_0/sensitivity_brainstorming.md"):
        assert (out / name).is_file(), name
    pngs = sorted(p.name for p in (out / "seed_0").glob("*.png"))
    assert pngs == ["sensitivity_brainstorming_cols.png", "sensitivity_brainstorming_rows.png",
                    "sensitivity_closed_qa_cols.png", "sensitivity_closed_qa_rows.png"]
    assert all((out / "seed_0" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    table = (out / "seed_0" / "sensitivity_all_groups.md").read_text()
    for needle in ("| closed_qa | A | q_proj | rows |", "| brainstorming | B | o_proj | cols |", "1.7", "41"):
        assert needle in table
    summary = json.loads((out / "seed_0" / "summary.json").read_text())
    assert summary["paper"] == {"a_dir_over_b_dir": 1.7, "b_mag_over_a_mag": 41.0}
    resp = summary["groups"]["closed_qa"]["responses"]
    assert resp["step"] == 4 and resp["draws"] == 2 and resp["base_loss"] > 0
    assert set(summary["overall_responses"]) == {"rows", "cols"}
    assert [r["step"] for r in json.loads((out / "seed_0" / "records.json").read_text())
            if r["group"] == "closed_qa" and r["factor"] == "A" and r["axis"] == "rows"
            and r["layer_type"] == "q_proj"] == [0, 2, 4]
    # the held-out rows are not trained on: 4 steps x batch 2 = 8 training rows drawn from the rest
    assert summary["groups"]["closed_qa"]["rows"] == 8
    for name in ("summary.md", "seed_0/summary.md"):
        assert "fedlora analyze sensitivity" in (out / name).read_text()
    assert "## Second reading" in (out / "seed_0" / "summary.md").read_text()


@needs_dolly
def test_seeds_resume_and_aggregate(tiny_dir, tmp_path, capsys):
    groups = ("--groups", "closed_qa,brainstorming")
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    assert main(_argv(tiny_dir, fresh, *groups, "--seeds", "0,1", "--perturb-at", "all")) == 0
    # a run stopped during seed 0's second group: closed_qa finished, brainstorming not
    assert main(_argv(tiny_dir, resumed, *groups, "--seeds", "0", "--perturb-at", "all")) == 0
    (resumed / "seed_0" / "run_brainstorming.json").unlink()
    # as in a clean checkout of a committed study: the run files are there, the snapshots are not
    (resumed / "seed_0" / "snapshots_closed_qa.pt").unlink()
    capsys.readouterr()
    assert main(_argv(tiny_dir, resumed, *groups, "--seeds", "0,1", "--perturb-at", "all")) == 0
    captured = capsys.readouterr()
    assert "seed 0: closed_qa already done, skipped" in captured.out
    assert "seed 0 closed_qa:" not in captured.out and "seed 0 brainstorming:" in captured.out
    assert not (resumed / "seed_0" / "snapshots_closed_qa.pt").exists()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (fresh, resumed))
    assert a["per_seed"] == b["per_seed"]  # resuming gives exactly the numbers of one uninterrupted run

    # each seed: its own LoRA init (A at step 0) and its own numbers
    s0, s1 = (torch.load(fresh / f"seed_{s}" / "snapshots_closed_qa.pt", weights_only=True) for s in (0, 1))
    a_name = next(n for n in s0["snapshots"][0][1] if ".lora_A." in n)
    assert not torch.equal(s0["snapshots"][0][1][a_name], s1["snapshots"][0][1][a_name])
    assert a["per_seed"]["0"] != a["per_seed"]["1"]
    # --perturb-at all: the response at every snapshot; B is zero at step 0, so its response there is exactly 0
    run = json.loads((fresh / "seed_0" / "run_closed_qa.json").read_text())
    assert [step for step, _ in run["responses"]] == [0, 2, 4]
    assert all(r["deltas"] == [0.0, 0.0] for r in run["responses"][0][1]["records"] if r["factor"] == "B")

    # the aggregate is the mean (and sample std) of the per-seed values
    for key, agg in a["aggregate"].items():
        vals = [a["per_seed"][s][key] for s in ("0", "1")]
        if all(math.isfinite(v) for v in vals):
            assert agg["mean"] == pytest.approx(sum(vals) / 2) and agg["n"] == 2
            assert agg["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert "response/all/rows/a_dir_over_b_dir" in a["aggregate"] and "loss/closed_qa/last" in a["aggregate"]
    assert " ± " in (fresh / "summary.md").read_text()

    # another setup on the same --out is refused in one line, nothing lost
    assert main(_argv(tiny_dir, resumed, *groups, "--seeds", "0,1", "--perturb-at", "all",
                      "--set", "train.lr=0.002")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another setup (train.lr: 0.001 there, 0.002 now)" in err
    assert (resumed / "seed_1" / "run_closed_qa.json").is_file()
    # other files in --out: refused without --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    assert main(_argv(tiny_dir, other, *groups)) == 2
    assert "--overwrite" in capsys.readouterr().err and (other / "x.txt").is_file()


@needs_ni
def test_analyze_sensitivity_on_ni_tasks(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ni"
    code = main(["analyze", "sensitivity", "--set", f"model.name={tiny_dir}",
                 "--set", "data.source=natural_instructions", "--set", f"data.path={NI}",
                 "--set", "max_instances_per_task=20", *[x for s in SMALL for x in ("--set", s)],
                 "--groups", "task1290_xsum_summarization", "--steps", "2", "--every", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "seed_0" / "sensitivity_task1290_xsum_summarization_rows.png").is_file()


@pytest.mark.parametrize("extra,needle", [
    (["--groups", "closed_qa,no_such_group"], "unknown task group(s) no_such_group"),
    (["--groups", ","], "at least one task group"),
    (["--steps", "0"], "--steps"),
    (["--every", "-1"], "--every"),
    (["--set", "roundz=2"], "did you mean"),
    (["--seeds", "0,x"], "--seeds: give comma-separated non-negative integers"),
    (["--seeds", "-1"], "--seeds"),
    (["--rho", "1.5"], "--rho: must be in (0, 1)"),
    (["--draws", "0"], "--draws"),
    (["--heldout", "0"], "--heldout"),
    (["--heldout", "100000", "--groups", "closed_qa"], "--heldout: task group 'closed_qa' has"),
    (["--perturb-at", "middle"], "--perturb-at: one of final, all, none"),
])
def test_bad_input_is_one_clear_line(tiny_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    code = main(["analyze", "sensitivity", "--set", f"model.name={tiny_dir}", "--set", f"data.path={DOLLY}",
                 "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not out.exists()
