"""`fedlora study` tuning (equal budgets, stages, winners on test) and the pilot study as part of a spec."""

import json

import pytest
from conftest import DOLLY

from fedlora.cli import main


def _tuning_spec(spec, budget=3, split="validation"):
    base = spec / "base.yaml"
    text = base.read_text().replace("global_test_per_label: 2}", "global_test_per_label: 2, validation_fraction: 0.2}")
    base.write_text(text)
    (spec / "tuned.yaml").write_text(
        "seeds: [0]\npaired_with: fedit\n"
        "tuning:\n  name: tune\n"
        f"  config: {base}\n  set: [eval.split={split}]\n  seed: 0\n  budget: {budget}\n"
        "  methods: {fedit: [], fedlora_opt: [method_options.local_lr_mult=1, method_options.pipeline=sequential],\n"
        "            fedlora_joint: {method: fedlora_opt, set: [method_options.local_lr_mult=1, "
        "method_options.pipeline=joint]}}\n"
        "  stages:\n"
        "    - {name: lr, all: [[train.lr=1.0e-4], [train.lr=3.0e-2]]}\n"
        "    - name: second\n"
        "      methods: {fedit: [[train.lr=*2]], fedlora_opt: [[train.personal_lr=*10]],\n"
        "                fedlora_joint: [[train.personal_lr=*10]]}\n"
        "experiments:\n"
        f"  test:\n    config: {base}\n    tuned: tune\n"
        "    methods: [fedit, fedlora_opt, {label: no_local, method: fedlora_opt, set: [train.personal_steps=0]},\n"
        "              {label: fedlora_joint, method: fedlora_opt},\n"
        "              {label: joint_all_shared, method: fedlora_opt, tuned_as: fedlora_joint,\n"
        "               set: [method_options.pipeline=sequential, train.personal_steps=0]}]\n")
    return spec / "tuned.yaml"


def test_tuning_equal_budget_stages_and_winners_run_on_test(spec, capsys):
    import yaml

    from fedlora.tuning import objective

    path = _tuning_spec(spec)
    out = spec / "study"
    assert main(["study", "--spec", str(path), "--out", str(out), "--set", "threads=1"]) == 0
    tune = json.loads((out / "tune" / "results.json").read_text())
    runs = tune["runs"]
    assert {m: len(r) for m, r in runs.items()} == {"fedit": 3, "fedlora_opt": 3, "fedlora_joint": 3}  # the budget
    for method, winner in tune["winners"].items():
        # the winner is the lowest objective over every run of the method, and stage 2 scaled stage 1's best
        assert winner["objective"] == min(r["objective"] for r in runs[method].values())
        first = min((lab for lab in runs[method] if "," not in lab and lab.startswith("lr=")),
                    key=lambda lab: runs[method][lab]["objective"])
        lr = float(first.split("=")[1])
        second = [lab for lab in runs[method] if lab not in ("lr=0.0001", "lr=0.03")]
        assert len(second) == 1
        want = f"lr={lr * 2:.3g}" if method == "fedit" else f"lr={lr:g},personal_lr={lr * 10:.3g}"
        assert second[0] == want
        run_cfg = yaml.safe_load((out / "tune" / method / second[0] / "seed_0" / "config.yaml").read_text())
        assert run_cfg["eval"]["split"] == "validation"
    # the test experiment: each method (and the ablation) with its winner's values, on the test split
    # (a second reading, tuned on its own budget, runs with its own winner's values)
    for label, tuned, pipeline in (("fedit", "fedit", None), ("fedlora_opt", "fedlora_opt", "sequential"),
                                   ("no_local", "fedlora_opt", "sequential"),
                                   ("fedlora_joint", "fedlora_joint", "joint")):
        cfg = yaml.safe_load((out / "test" / label / "seed_0" / "config.yaml").read_text())
        assert cfg["eval"]["split"] == "test" and cfg["method"] == ("fedit" if tuned == "fedit" else "fedlora_opt")
        sets = dict(s.split("=", 1) for s in tune["winners"][tuned]["sets"])
        assert cfg["train"]["lr"] == pytest.approx(float(sets["train.lr"]))
        assert pipeline is None or cfg["method_options"]["pipeline"] == pipeline
    assert yaml.safe_load((out / "test" / "no_local" / "seed_0" / "config.yaml").read_text()
                          )["train"]["personal_steps"] == 0
    # an ablation of the second reading (tuned_as): that reading's winning values, then its own change
    cfg = yaml.safe_load((out / "test" / "joint_all_shared" / "seed_0" / "config.yaml").read_text())
    sets = dict(s.split("=", 1) for s in tune["winners"]["fedlora_joint"]["sets"])
    assert cfg["train"]["lr"] == pytest.approx(float(sets["train.lr"]))
    assert cfg["train"]["personal_steps"] == 0 and cfg["method_options"]["pipeline"] == "sequential"
    assert "**winner**" in (out / "summary.md").read_text()

    # published: the result files copied, the report built from the copies, embedded between a doc's markers
    from fedlora.study_report import BEGIN, END

    doc = spec / "results.md"
    doc.write_text(f"# Results\n\nhand-written words\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    pub = spec / "published"
    assert main(["study", "--spec", str(path), "--out", str(out), "--publish", str(pub), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nhand-written words") and text.endswith(f"{END}\n\nafter\n")
    assert "old" not in text and "9 of 9 runs finished." in text
    assert json.loads((pub / "test" / "results.json").read_text()) == json.loads((out / "test" / "results.json").read_text())
    assert (pub / "test" / "results.md").read_text() in text
    w = json.loads((pub / "tune" / "results.json").read_text())["winners"]["fedit"]
    assert f"| fedit | {w['sets'][1]} | {w['stage']} | {w['objective']:.4f} |" in text
    doc.write_text("no markers\n")
    capsys.readouterr()
    assert main(["study", "--spec", str(path), "--out", str(out), "--publish", str(pub), "--doc", str(doc)]) == 2
    assert "has no study-report markers" in capsys.readouterr().err
    assert objective({"global_loss": float("nan"), "local_loss": 1.0}, ["global_loss", "local_loss"]) == float("inf")
    capsys.readouterr()


def test_tuning_refuses_unequal_budgets_and_the_test_split(spec, capsys):
    assert main(["study", "--spec", str(_tuning_spec(spec, budget=4)), "--out", str(spec / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: study spec {spec / 'tuned.yaml'}: tuning gives fedit 3 runs; the budget is 4 for every method")
    assert main(["study", "--spec", str(_tuning_spec(spec, split="test")), "--out", str(spec / "o")]) == 2
    assert "tuning must set eval.split=validation" in capsys.readouterr().err
    # an entry that cannot build with its tuning entry's fixed overrides fails before anything runs
    path = _tuning_spec(spec)
    path.write_text(path.read_text().replace(
        "{label: fedlora_joint, method: fedlora_opt},",
        "{label: fedlora_joint, method: fedlora_opt},\n              "
        "{label: bad, method: fedlora_opt,\n"
        "               set: [method_options.pipeline=joint, method_options.personal_mode=persist]},").replace(
        "{label: no_local,", "{label: fine, method: fedlora_opt, set: [method_options.personal_mode=reset]},\n"
        "              {label: no_local,"))
    assert main(["study", "--spec", str(path), "--out", str(spec / "o2")]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"error: study spec {path}: experiment 'test', bad: method_options: fedlora_opt: ")
    assert not (spec / "o2" / "tune").exists()
    # tuned_as must name an entry of the experiment's tuning
    path = _tuning_spec(spec)
    path.write_text(path.read_text().replace("tuned_as: fedlora_joint", "tuned_as: fedlora_jiont"))
    assert main(["study", "--spec", str(path), "--out", str(spec / "o3")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: study spec {path}: experiment 'test', joint_all_shared: tuned_as: 'fedlora_jiont' is not an entry "
        "of this experiment's tuning")


def test_the_pilot_study_is_part_of_the_spec(spec, capsys):
    """`pilot:` runs `fedlora analyze sensitivity` into <out>/pilot once; a rerun skips it; publish shows it."""
    model = spec / "tiny"
    args = ["--set", f"model.name={model}", "--set", f"data.path={DOLLY}", "--set", "max_length=64",
            "--set", "train.batch_size=2", "--set", "model.threads=1", "--groups", "closed_qa,brainstorming",
            "--seeds", "0", "--steps", 2, "--every", 1, "--heldout", "2", "--draws", "1"]
    path = spec / "with_pilot.yaml"
    path.write_text((spec / "spec.yaml").read_text() + "pilot:\n  description: tiny\n  args: " + json.dumps(args)
                    + "\n")
    out = spec / "study"
    assert main(["study", "--spec", str(path), "--out", str(out), "--only", "pilot"]) == 0
    assert "pilot: fedlora analyze sensitivity" in capsys.readouterr().out
    summary = json.loads((out / "pilot" / "summary.json").read_text())
    assert summary["seeds"] == [0] and summary["groups"] == ["closed_qa", "brainstorming"]
    assert not (out / "small").exists()  # --only pilot ran nothing else
    assert main(["study", "--spec", str(path), "--out", str(out), "--only", "pilot"]) == 0
    assert "pilot: fedlora analyze sensitivity" not in capsys.readouterr().out
    pub = spec / "published"
    assert main(["study", "--spec", str(path), "--out", str(out), "--publish", str(pub)]) == 0
    report = capsys.readouterr().out
    assert (pub / "pilot" / "summary.md").read_text() in report and "Not finished: 0 of 4 runs done" in report


def test_two_processes_share_the_pilot_seed_by_seed(spec, capsys):
    """Each seed is claimed on its own: a seed another live process holds is left to it, the others run; the
    summary over the seeds is written once every seed is done."""
    import os

    from rich.console import Console

    from fedlora.results import PILOT_DONE
    from fedlora.study import _pilot
    from fedlora.study_dirs import CLAIM

    args = ["--set", f"model.name={spec / 'tiny'}", "--set", f"data.path={DOLLY}", "--set", "max_length=64",
            "--set", "train.batch_size=2", "--set", "model.threads=1", "--groups", "closed_qa",
            "--seeds", "0,1", "--steps", 2, "--every", 1, "--perturb-at", "none"]
    out = spec / "study"
    held = out / "pilot.claim" / "seed_1"
    held.mkdir(parents=True)
    (held / CLAIM).write_text(str(os.getppid()))  # a live process that is not this one
    console = Console()
    assert _pilot({"pilot": {"args": args}}, out, console) == "ran"
    assert (out / "pilot" / "seed_0" / "summary.json").is_file()
    assert not (out / "pilot" / "seed_1").exists() and not (out / PILOT_DONE).exists()
    assert _pilot({"pilot": {"args": args}}, out, console) == "held"  # only seed 1 is left, and it is held
    (held / CLAIM).unlink()  # its owner gave it up
    assert _pilot({"pilot": {"args": args}}, out, console) == "ran"
    assert json.loads((out / "pilot" / "summary.json").read_text())["seeds"] == [0, 1]
    assert (out / PILOT_DONE).is_file() and _pilot({"pilot": {"args": args}}, out, console) == "done"
    capsys.readouterr()
