"""`fedlora study` on the tiny model: every run written and resumable, the tables and the paired differences."""

import json

import pytest

from fedlora.cli import main
from fedlora.paired import paired_differences, paired_table


def test_study_runs_every_method_and_seed_then_skips_them(spec, capsys):
    out = spec / "study"
    assert main(["study", "--spec", str(spec / "spec.yaml"), "--out", str(out), "--set", "threads=1"]) == 0
    for label in ("fedit", "fedlora_cols"):
        for seed in (0, 1):
            run = json.loads((out / "small" / label / f"seed_{seed}" / "results.json").read_text())
            assert run["provenance"]["seed"] == seed
    cols = json.loads((out / "small" / "fedlora_cols" / "seed_0" / "results.json").read_text())
    assert cols["provenance"]["method"] == "fedlora_opt"
    table = (out / "small" / "results.md").read_text()
    assert "| fedlora_cols | 2 |" in table and "Paired by seed against fedit" in table
    summary = json.loads((out / "small" / "results.json").read_text())
    d = summary["paired"]["fedlora_cols"]["global_loss"]
    assert d["seeds"] == 2 and len(d["per_seed"]) == 2
    assert "## small" in (out / "summary.md").read_text()
    both = json.loads((out / "both_refs" / "results.json").read_text())
    assert both["paired_with"] == "fedit" and set(both["paired"]) == {"fedlora_opt", "fedsa"}
    assert set(both["paired_also"]) == {"fedlora_opt"} and set(both["paired_also"]["fedlora_opt"]) == {"fedit", "fedsa"}
    fedsa_vs_fedit = both["paired"]["fedsa"]["global_loss"]["mean"]
    fedsa_vs_opt = both["paired_also"]["fedlora_opt"]["fedsa"]["global_loss"]["mean"]
    opt_vs_fedit = both["paired"]["fedlora_opt"]["global_loss"]["mean"]
    assert fedsa_vs_opt == pytest.approx(fedsa_vs_fedit - opt_vs_fedit)
    assert "Paired by seed against fedlora_opt" in (out / "both_refs" / "results.md").read_text()
    capsys.readouterr()

    # a second run finds every run finished and only rebuilds the tables
    before = (out / "small" / "fedit" / "seed_0" / "results.json").read_bytes()
    assert main(["study", "--spec", str(spec / "spec.yaml"), "--out", str(out)]) == 0
    assert "small/fedit/seed_0: done, skipped" in capsys.readouterr().out
    assert (out / "small" / "fedit" / "seed_0" / "results.json").read_bytes() == before

    # <out>/STOP: no further run starts, the process ends cleanly; without it the study goes on
    (out / "small" / "fedit" / "seed_1" / "results.json").unlink()
    (out / "STOP").touch()
    (out / "small" / "partial.md").unlink(missing_ok=True)
    assert main(["study", "--spec", str(spec / "spec.yaml"), "--out", str(out)]) == 0
    assert f"study: {out / 'STOP'} exists, so no further run starts" in capsys.readouterr().out
    assert not (out / "small" / "fedit" / "seed_1" / "results.json").exists()
    partial = (out / "small" / "partial.md").read_text()  # the tables as of the runs finished when it stopped
    assert "| fedlora_cols | 2 |" in partial and "| fedit |" not in partial
    (out / "STOP").unlink()
    assert main(["study", "--spec", str(spec / "spec.yaml"), "--out", str(out)]) == 0
    rerun = json.loads((out / "small" / "fedit" / "seed_1" / "results.json").read_text())
    # a new process reuses the base model's evaluation of a finished run with the same data, seed and settings
    same_seed = json.loads((out / "small" / "fedlora_cols" / "seed_1" / "results.json").read_text())
    assert rerun["base_eval"]["reused_from"] == "small/fedlora_cols/seed_1"
    assert {k: v for k, v in rerun["base_eval"].items() if k != "reused_from"} == same_seed["base_eval"]
    other_seed = json.loads((out / "small" / "fedlora_cols" / "seed_0" / "results.json").read_text())
    assert other_seed["base_eval"]["local"] != same_seed["base_eval"]["local"]  # another partition: not reused


def test_a_run_stopped_mid_way_resumes_from_its_checkpoint(spec, capsys):
    """A study run with a checkpoint (a process stopped after round 1 of 2) continues from it, to the numbers of
    the uninterrupted run; with another config it restarts from scratch."""
    import shutil

    args = ["study", "--spec", str(spec / "spec.yaml"), "--only", "both_refs", "--set", "threads=1",
            "--set", "federation.rounds=2", "--set", "output.checkpoint_every=1"]
    out = spec / "study"
    assert main([*args, "--out", str(out)]) == 0
    run = out / "both_refs" / "fedlora_opt" / "seed_0"
    whole = json.loads((run / "results.json").read_text())
    (run / "results.json").unlink()
    shutil.rmtree(run / "checkpoints" / "round-000002")
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert "both_refs: fedlora_opt (seed 0), resuming after round 1" in capsys.readouterr().out
    resumed = json.loads((run / "results.json").read_text())
    same = lambda r: {k: v for k, v in r["summary"].items() if k != "wall_time"}  # noqa: E731
    assert same(resumed) == same(whole) and resumed["summary"]["global_loss"] > 0
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # another config: the checkpoint does not fit, the run starts again
    (run / "results.json").unlink()
    shutil.rmtree(run / "checkpoints" / "round-000002")
    assert main([*args, "--set", "train.lr=1e-3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "both_refs: fedlora_opt (seed 0)" in text and "resuming" not in text


def test_study_bad_input_is_one_line(spec, capsys):
    assert main(["study", "--spec", str(spec / "spec.yaml"), "--only", "nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --only: no experiment 'nope' in {spec / 'spec.yaml'}; it has small, both_refs"]
    assert main(["study", "--spec", str(spec / "missing.yaml")]) == 2
    assert "study spec not found" in capsys.readouterr().err
    (spec / "bad_order.yaml").write_text((spec / "spec.yaml").read_text().replace(
        "    description: two methods\n", "    description: two methods\n    order: seed_first\n"))
    assert main(["study", "--spec", str(spec / "bad_order.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: study spec {spec / 'bad_order.yaml'}: experiment 'small': order must be one of methods_first, "
        "seeds_first, not 'seed_first'"]


@pytest.mark.parametrize("order", ["methods_first", "seeds_first"])
def test_an_experiment_takes_its_runs_seed_by_seed_or_method_by_method(spec, capsys, order):
    (spec / "ordered.yaml").write_text((spec / "spec.yaml").read_text().replace(
        "    description: two methods\n", f"    description: two methods\n    order: {order}\n"))
    out = spec / "study"
    assert main(["study", "--spec", str(spec / "ordered.yaml"), "--out", str(out), "--only", "small"]) == 0
    printed = capsys.readouterr().out
    started = sorted((printed.index(f"small: {label} (seed {seed})"), label, seed)
                     for label in ("fedit", "fedlora_cols") for seed in (0, 1))
    expected = ([("fedit", 0), ("fedit", 1), ("fedlora_cols", 0), ("fedlora_cols", 1)] if order == "methods_first"
                else [("fedit", 0), ("fedlora_cols", 0), ("fedit", 1), ("fedlora_cols", 1)])
    assert [(label, seed) for _, label, seed in started] == expected
    assert (out / "small" / "results.json").is_file()


def test_partial_tables_show_every_method_over_the_same_seeds(tmp_path):
    """methods_first: the methods with every seed finished; seeds_first: the methods finished at the first seed, over
    the seeds all of them have finished (never one method over more seeds than another)."""
    from fedlora.study_dirs import finished_so_far

    entries = [("fedit", []), ("joint", []), ("feddpa", [])]
    for label, seed in [("fedit", 0), ("fedit", 1), ("fedit", 2), ("joint", 0), ("joint", 1), ("feddpa", 1)]:
        (tmp_path / label / f"seed_{seed}").mkdir(parents=True)
        (tmp_path / label / f"seed_{seed}" / "results.json").write_text("{}")
    seeds = [0, 1, 2]
    assert finished_so_far(tmp_path, {}, entries, seeds) == (seeds, [("fedit", [])])
    assert finished_so_far(tmp_path, {"order": "seeds_first"}, entries, seeds) == ([0, 1], entries[:2])
    (tmp_path / "joint" / "seed_1" / "results.json").unlink()
    assert finished_so_far(tmp_path, {"order": "seeds_first"}, entries, seeds) == ([0], entries[:2])


def test_paired_differences_by_seed():
    by_label = {"fedit": {0: {"global_loss": 2.0, "local_loss": 1.0}, 1: {"global_loss": 3.0, "local_loss": 2.0}},
                "m": {0: {"global_loss": 1.9, "local_loss": 1.1}, 1: {"global_loss": 2.8, "local_loss": 1.9}}}
    d = paired_differences(by_label, "fedit")["m"]
    assert d["global_loss"]["mean"] == pytest.approx(-0.15) and d["global_loss"]["better"] == 2
    assert d["global_loss"]["std"] == pytest.approx(0.05)
    assert d["local_loss"]["mean"] == pytest.approx(0.0) and d["local_loss"]["better"] == 1
    assert "global_rouge_l" not in d
    header = paired_table({"m": d}, "fedit", 2).splitlines()[2]
    assert header == "| method | global loss | local loss | global ROUGE-L | local ROUGE-L |"

    # tasks no client holds (NI): their loss is paired too, and its column shown, where the runs have it
    for s, unseen in zip((0, 1), (3.0, 2.0)):
        by_label["fedit"][s]["unseen_loss"] = unseen
        by_label["m"][s]["unseen_loss"] = unseen - 0.25
    e = paired_differences(by_label, "fedit")["m"]
    assert e["unseen_loss"]["mean"] == pytest.approx(-0.25) and e["unseen_loss"]["better"] == 2
    table = paired_table({"m": e}, "fedit", 2).splitlines()
    assert table[2].endswith("| local ROUGE-L | unseen-task loss |")
    assert table[4].endswith("| -0.2500 [-0.2500, -0.2500] (2/2) |")


def test_run_claims_between_processes(tmp_path):
    import os
    import subprocess
    import sys

    from fedlora.study_dirs import CLAIM, CLAIM_WRITE_GRACE_S, claim as _claim, empty_but_claim

    run = tmp_path / "exp" / "m" / "seed_0"
    assert _claim(run) and (run / CLAIM).read_text() == str(os.getpid())
    assert _claim(run)  # this process already holds it
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / CLAIM).write_text(str(other.pid))
        assert not _claim(run)  # held by another live process
    finally:
        other.kill()
        other.wait()
    assert _claim(run)  # its owner is gone: taken over
    assert (run / CLAIM).read_text() == str(os.getpid())
    # a claim file another process has just created and not yet written its pid into is held, not taken
    (run / CLAIM).write_text("")
    assert not _claim(run)
    old = (run / CLAIM).stat().st_mtime - CLAIM_WRITE_GRACE_S - 1
    os.utime(run / CLAIM, (old, old))  # still empty long after: left by a crash, taken over
    assert _claim(run) and (run / CLAIM).read_text() == str(os.getpid())
    # an unfinished run restarts in its emptied directory without letting go of the claim
    (run / "checkpoints").mkdir()
    (run / "metrics.jsonl").write_text("{}")
    empty_but_claim(run)
    assert [p.name for p in run.iterdir()] == [CLAIM] and (run / CLAIM).read_text() == str(os.getpid())


def test_a_study_directory_under_git_keeps_only_its_records(tmp_path):
    """Committing a study's --out commits the records a clean checkout resumes from, not checkpoints or claims."""
    import subprocess

    from fedlora.study_dirs import CLAIM, keep_records_only

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    root = tmp_path / "study"
    run = root / "exp" / "fedit" / "seed_0"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("results.json", "metrics.jsonl", "config.yaml", CLAIM, "checkpoints/round_1.pt", "adapter.bin"):
        (run / name).write_text("x")
    (root / "exp" / "results.md").write_text("x")
    (root / "pilot" / "seed_0").mkdir(parents=True)
    for name in ("run_closed_qa.json", "snapshots_closed_qa.pt", "summary.json"):  # the pilot resumes from run_*
        (root / "pilot" / "seed_0" / name).write_text("x")
    keep_records_only(root)
    tracked = subprocess.run(["git", "-C", str(tmp_path), "ls-files", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert sorted(tracked) == ["study/.gitignore", "study/exp/fedit/seed_0/config.yaml",
                               "study/exp/fedit/seed_0/results.json",
                               "study/exp/results.md", "study/pilot/seed_0/run_closed_qa.json",
                               "study/pilot/seed_0/summary.json"]


def test_two_processes_share_one_study(spec, tmp_path):
    """Two `fedlora study` processes on one spec: every run is done exactly once, both finish with the tables."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "shared-study"
    fedlora = str(Path(sys.executable).parent / "fedlora")
    cmd = [fedlora, "study", "--spec", str(spec / "spec.yaml"), "--out", str(out), "--set", "threads=1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    for label in ("fedit", "fedlora_cols"):
        for seed in (0, 1):
            started = sum(log.count(f"small: {label} (seed {seed})") for log in logs)
            assert started == 1, (label, seed, logs)
            assert (out / "small" / label / f"seed_{seed}" / "results.json").is_file()
    assert all("Paired by seed against fedit" in log for log in logs)


def _held_run(run_dir, seconds: int):
    """A run claimed by another live process (a sleeping child whose pid is in the claim): (run dir, process)."""
    import subprocess
    import sys

    from fedlora.study_dirs import CLAIM

    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    (run_dir / CLAIM).write_text(str(holder.pid))
    return run_dir, holder


def test_a_run_held_elsewhere_does_not_hold_up_the_other_experiments(spec, tmp_path):
    """While another live process holds one run of the first experiment, this process runs the second
    experiment's runs; when the holder dies, it takes the run over and writes the first experiment's tables."""
    import threading
    import time

    two = spec / "two.yaml"
    two.write_text(
        "seeds: [0]\nexperiments:\n"
        f"  first:\n    config: {spec / 'base.yaml'}\n    methods: [fedit, ffa]\n"
        f"  second:\n    config: {spec / 'base.yaml'}\n    methods: [fedsa]\n")
    out = tmp_path / "held"
    held, holder = _held_run(out / "first" / "fedit" / "seed_0", seconds=120)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault(
        "rc", main(["study", "--spec", str(two), "--out", str(out), "--set", "threads=1"])))
    worker.start()
    try:
        second = out / "second" / "results.md"
        deadline = time.time() + 300
        while not second.is_file() and time.time() < deadline and worker.is_alive():
            time.sleep(0.5)
        assert second.is_file(), "the second experiment waited for the first one's held run"
        assert not (held / "results.json").exists() and worker.is_alive()
        # meanwhile the first experiment's finished method is tabled, marked partial, and published as such
        partial = json.loads((out / "first" / "partial.json").read_text())
        assert partial["methods_finished"] == ["ffa"] and partial["methods"] == ["fedit", "ffa"]
        assert not (out / "first" / "results.json").exists()
        pub = tmp_path / "pub"
        assert main(["study", "--spec", str(two), "--out", str(out), "--publish", str(pub)]) == 0
        report = (pub / "README.md").read_text()
        assert "Not finished: 1 of 2 runs done" in report and "PARTIAL" in report and "still running: fedit" in report
        assert (pub / "first" / "partial.md").read_text() in report
    finally:
        holder.kill()
        holder.wait()
    worker.join(timeout=300)
    assert result.get("rc") == 0
    assert (held / "results.json").is_file() and (out / "first" / "results.md").is_file()
    assert not (out / "first" / "partial.json").exists()  # the whole table replaces the partial one
    assert main(["study", "--spec", str(two), "--out", str(out), "--publish", str(pub)]) == 0
    assert "PARTIAL" not in (pub / "README.md").read_text() and not (pub / "first" / "partial.md").exists()


def test_an_experiment_finished_by_another_process_is_tabled_at_once(spec, tmp_path):
    """When another process finishes the last run of an experiment this process passed, its final tables are
    written after this process's next run, not only after every later experiment."""
    import shutil
    import threading
    import time

    from fedlora.study_dirs import CLAIM

    three = spec / "three.yaml"
    three.write_text(
        "seeds: [0]\nexperiments:\n"
        f"  first:\n    config: {spec / 'base.yaml'}\n    methods: [ffa, fedit]\n"
        f"  second:\n    config: {spec / 'base.yaml'}\n    methods: [fedsa]\n"
        f"  third:\n    config: {spec / 'base.yaml'}\n    methods: [fedit]\n")
    out = tmp_path / "closed"
    held, holder = _held_run(out / "first" / "fedit" / "seed_0", seconds=300)

    def other_process_finishes_the_held_run():
        # once this process has moved on to the second experiment, the holder "finishes" its run
        deadline = time.time() + 300
        while not (out / "second" / "fedsa" / "seed_0" / CLAIM).is_file() and time.time() < deadline:
            time.sleep(0.01)
        shutil.copy(out / "first" / "ffa" / "seed_0" / "results.json", held / "results.json")
        holder.kill()

    helper = threading.Thread(target=other_process_finishes_the_held_run)
    helper.start()
    try:
        assert main(["study", "--spec", str(three), "--out", str(out), "--set", "threads=1"]) == 0
    finally:
        holder.kill()
        holder.wait()
        helper.join(timeout=300)
    first_tables = (out / "first" / "results.md").stat().st_mtime
    assert not (out / "first" / "partial.md").exists()
    assert first_tables < (out / "third" / "fedit" / "seed_0" / "results.json").stat().st_mtime


def test_paired_confidence_interval_is_the_t_interval():
    from fedlora.paired import confidence_interval

    # n = 5, mean 0.1, sample sd 0.1: t_{0.975, 4} = 2.776445 -> half width 0.124166
    diffs = [0.0, 0.05, 0.1, 0.15, 0.25]
    diffs = [d - sum(diffs) / 5 + 0.1 for d in diffs]
    import numpy as np
    sd = float(np.std(diffs, ddof=1))
    lo, hi = confidence_interval(diffs)
    assert (hi - lo) / 2 == pytest.approx(2.776445 * sd / 5 ** 0.5, rel=1e-5)
    assert (lo + hi) / 2 == pytest.approx(0.1)
    assert confidence_interval([0.3]) is None
    by_label = {"ref": {s: {"global_loss": 1.0} for s in range(5)},
                "m": {s: {"global_loss": 1.0 + d} for s, d in enumerate(diffs)}}
    e = paired_differences(by_label, "ref")["m"]["global_loss"]
    assert e["significant"] == (lo > 0) and e["ci95"] == pytest.approx([lo, hi])
    assert paired_differences({"ref": by_label["ref"], "m": {s: {"global_loss": 1.0 + (-1) ** s * 0.1}
                                                              for s in range(5)}}, "ref")["m"]["global_loss"][
        "significant"] is False
