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

SMALL = ["max_length=64", "train.batch_size=2", "lora.dropout=0.0", "train.lr=0.001"]


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


@needs_dolly
def test_analyze_sensitivity_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pilot"
    argv = ["analyze", "sensitivity", "--set", f"model.name={tiny_dir}", "--set", f"data.path={DOLLY}",
            *[x for s in SMALL for x in ("--set", s)],
            "--groups", "closed_qa,brainstorming", "--steps", "4", "--every", "2", "--out", str(out)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "A:B dir" in captured.out and "all groups" in captured.out
    for name in ("summary.md", "summary.json", "records.json", "sensitivity_all_groups.md", "snapshots_closed_qa.pt",
                 "sensitivity_closed_qa.md", "sensitivity_brainstorming.md"):
        assert (out / name).is_file(), name
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["sensitivity_brainstorming_cols.png", "sensitivity_brainstorming_rows.png",
                    "sensitivity_closed_qa_cols.png", "sensitivity_closed_qa_rows.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    table = (out / "sensitivity_all_groups.md").read_text()
    for needle in ("| closed_qa | A | q_proj | rows |", "| brainstorming | B | o_proj | cols |", "1.7", "41"):
        assert needle in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paper"] == {"a_dir_over_b_dir": 1.7, "b_mag_over_a_mag": 41.0}
    assert [r["step"] for r in json.loads((out / "records.json").read_text())
            if r["group"] == "closed_qa" and r["factor"] == "A" and r["axis"] == "rows"
            and r["layer_type"] == "q_proj"] == [0, 2, 4]
    assert "fedlora analyze sensitivity" in (out / "summary.md").read_text()
    # the same output directory again: refused without --overwrite, nothing lost
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "summary.md").is_file()


@needs_ni
def test_analyze_sensitivity_on_ni_tasks(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ni"
    code = main(["analyze", "sensitivity", "--set", f"model.name={tiny_dir}",
                 "--set", "data.source=natural_instructions", "--set", f"data.path={NI}",
                 "--set", "max_instances_per_task=20", *[x for s in SMALL for x in ("--set", s)],
                 "--groups", "task1290_xsum_summarization", "--steps", "2", "--every", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "sensitivity_task1290_xsum_summarization_rows.png").is_file()


@pytest.mark.parametrize("extra,needle", [
    (["--groups", "closed_qa,no_such_group"], "unknown task group(s) no_such_group"),
    (["--groups", ","], "at least one task group"),
    (["--steps", "0"], "--steps"),
    (["--every", "-1"], "--every"),
    (["--set", "roundz=2"], "did you mean"),
])
def test_bad_input_is_one_clear_line(tiny_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    code = main(["analyze", "sensitivity", "--set", f"model.name={tiny_dir}", "--set", f"data.path={DOLLY}",
                 "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not out.exists()
