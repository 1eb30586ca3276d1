"""`fedlora study`: the method study, as a list of experiments, resumable run by run.

A study spec (YAML) names experiments; each is a base config plus `--set` overrides, a list of methods and seeds,
and the order its runs are taken in (`order`: methods_first, the default, or seeds_first). An experiment `tuned` by
the spec's tuning runs each method entry at the winning values of the tuning entry its `tuned_as` names (an
ablation of a second reading), else of the one named like its label, else of its method's; then its own `set`.
Every (experiment, method, seed) run writes its own directory; finished runs are skipped, so a study interrupted (or
spread over several GPU leases) is completed by running the same command again. An unfinished run continues from its newest
checkpoint when one fits its config and data (`output.checkpoint_every`), else it starts again.

Several processes can work on one study (e.g. one per CPU core or GPU, each with `--set threads=1`): each
run directory is claimed (an exclusive `.claimed` file with the owner's pid) before it runs, so a process skips
runs another live process holds and takes over those of a dead one; an experiment's tables are written once all
its runs are finished. `--only` splits by experiment instead. `summary.md` always lists every finished
experiment of the spec, whichever process wrote it. A file named STOP in --out stops every process gracefully:
each finishes the run it is on and starts no other (delete STOP to go on).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from . import results as res
from .errors import ConfigError, UserError
from .paired import paired_differences, paired_table
from .study_dirs import CLAIM, claim, empty_but_claim, finished_so_far, keep_records_only, learn_base_evals
from .study_spec import check_entries, load_spec, method_entry, run_order, tuned_method_entry
from .tuning import plan, tuning_table


STOP = "STOP"


class StudyStopped(Exception):
    """<out>/STOP exists: this process finished its run and starts no other."""


def run_study(spec_path: str, out: str, *, quick: bool, only: list[str] | None, console: Console,
              overrides: list[str] | None = None) -> Path:
    """Run the spec's tuning and experiments (or `only` those); `overrides` apply to every run (e.g. threads=1)."""
    from .config import load_config
    from .runner import Session, run_experiment

    spec = load_spec(spec_path)
    tuning = spec.get("tuning")
    if only:
        names = list(spec["experiments"]) + ([tuning["name"]] if tuning else []) + (["pilot"] if spec.get("pilot")
                                                                                    else [])
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(f"--only: no experiment {unknown[0]!r} in {spec_path}; it has {', '.join(names)}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    keep_records_only(root)
    quick_sets = list(spec.get("quick", [])) if quick else []
    session = None
    plans = []
    for name, exp in spec["experiments"].items():
        if only and name not in only:
            continue
        sets = list(exp.get("set", [])) + (quick_sets + list(exp.get("quick", [])) if quick else [])
        sets += list(overrides or [])
        seeds = exp.get("seeds", spec.get("seeds", [0]))
        if quick:
            seeds = seeds[:1]
        base = load_config(exp["config"], sets)  # a bad spec fails here, before anything runs
        if session is None:
            session = Session(base, console)
        if exp.get("tuned") and (not tuning or exp["tuned"] != tuning["name"]):
            raise ConfigError(f"study spec {spec_path}: experiment '{name}' is tuned by '{exp['tuned']}', which is "
                              "not the spec's tuning")
        plans.append((name, exp, sets, seeds, [method_entry(e) for e in exp["methods"]]))
    check_entries(plans, tuning, spec_path)
    tune_sets = list((tuning or {}).get("set", [])) + quick_sets + list(overrides or [])
    run_tuning = bool(tuning) and (not only or tuning["name"] in only or any(p[1].get("tuned") for p in plans))
    if run_tuning:
        base = load_config(tuning["config"], tune_sets)
        session = session or Session(base, console)
    run_pilot = bool(spec.get("pilot")) and (not only or "pilot" in only)
    announced: set[Path] = set()
    ran: set[Path] = set()  # the runs this process ran (not those it found finished)
    learned: set[Path] = set()  # the finished runs whose base-model evaluation the session has

    def finished_or_run(run_dir: Path, config: str, sets: list[str], title: str) -> bool:
        """True once the run is finished (by this process now, or before, or by another process)."""
        if (run_dir / "results.json").is_file():
            if run_dir not in announced:
                console.print(f"[dim]{run_dir.relative_to(root).as_posix()}: done, skipped")
            announced.add(run_dir)
            return True
        if (root / STOP).exists():
            raise StudyStopped(f"study: {root / STOP} exists, so no further run starts (delete it to go on)")
        if not claim(run_dir):
            return False  # another live process is running it
        cfg = load_config(config, sets)
        cfg.output.dir = str(run_dir)
        learn_base_evals(root, run_dir.parent.parent, session, learned)
        ckpt = _resumable(run_dir, cfg, session)
        if ckpt is None:
            empty_but_claim(run_dir)  # an unfinished run without a checkpoint restarts; the claim stays put
        console.rule(title + (f", resuming after round {ckpt.round}" if ckpt else ""))
        run_experiment(session, cfg, run_dir, show_partition=False, resume=ckpt)
        (run_dir / CLAIM).unlink(missing_ok=True)
        announced.add(run_dir)
        ran.add(run_dir)
        return True

    def tuning_step() -> tuple[dict[str, dict] | None, bool]:
        """(the winners once every method's tuning is finished, else None; whether runs of another process
        are awaited). Runs every tuning run this process can take now."""
        troot = root / tuning["name"]
        seed = int(tuning.get("seed", 0))
        load = lambda extra: load_config(tuning["config"], tune_sets + extra)  # noqa: E731
        def write_table() -> tuple[list, dict]:
            todo, winners = plan(tuning, troot, load, spec_path)
            table, record = tuning_table(tuning, troot, winners)  # also while unfinished: the runs so far
            troot.mkdir(parents=True, exist_ok=True)
            res.atomic_write(troot / "results.md", table)
            res.write_json(troot / "results.json", record)
            return todo, winners

        while True:
            todo, winners = write_table()
            if not todo:
                return winners, False
            ran = []
            for run in todo:
                ran.append(finished_or_run(run.run_dir(troot, seed), tuning["config"],
                                           tune_sets + list(run.sets) + [f"seed={seed}"],
                                           f"{tuning['name']}: {run.method} {run.stage} {run.label} (seed {seed})"))
                if ran[-1]:
                    write_table()  # the table is current after every run
            if not any(ran):
                return None, True

    # Every free run first; an experiment's tables are written once all its runs are finished, so a process waits
    # for another's runs only when nothing is left for it to run. Tuned experiments start once tuning is finished.
    winners: dict[str, dict] | None = None
    while True:
        waiting = False
        if run_tuning and winners is None:
            winners, waiting = tuning_step()
        pending = []
        waiting: list[tuple] = []  # (plan, entries): experiments this pass left to runs of another process

        def close_waiting() -> None:
            """The final tables of an experiment passed earlier in this pass, as soon as another process has
            finished its last run, not on this process's next pass (after every later experiment)."""
            for item in list(waiting):
                (w_name, w_exp, w_sets, w_seeds, _), w_entries = item
                if all((root / w_name / label / f"seed_{seed}" / "results.json").is_file()
                       for label, _, seed in run_order(w_exp, w_entries, w_seeds)):
                    _write_experiment_tables(root, w_name, w_exp, spec, w_sets, w_seeds, w_entries)
                    waiting.remove(item)
                    pending.remove(item[0])

        for plan_ in plans:
            name, exp, sets, seeds, entries = plan_
            if exp.get("tuned"):
                if winners is None:
                    pending.append(plan_)
                    continue
                entries = [tuned_method_entry(e, winners, name) for e in exp["methods"]]
            def write_partial() -> None:
                _write_experiment_tables(root, name, exp, spec, sets, *finished_so_far(root / name, exp, entries,
                                                                                         seeds), partial=True)

            left = []
            for label, extra, seed in run_order(exp, entries, seeds):
                run_dir = root / name / label / f"seed_{seed}"
                ran_before = len(ran)
                try:
                    finished = finished_or_run(run_dir, exp["config"], sets + extra + [f"seed={seed}"],
                                               f"{name}: {label} (seed {seed})")
                except StudyStopped:
                    write_partial()  # a stopped study leaves each experiment's tables as of its finished runs
                    raise
                if not finished:
                    left.append((label, seed))
                elif len(ran) > ran_before:  # this process just ran it: the partial tables are current after
                    write_partial()          # every run it finishes, not only at the end
                    close_waiting()
            if left:
                pending.append(plan_)
                waiting.append((plan_, entries))
                write_partial()
                console.print(f"[dim]{name}: waiting for {len(left)} run(s) of another process "
                              f"({', '.join(f'{l}/seed_{s}' for l, s in left[:3])}{' ...' if len(left) > 3 else ''})")
            else:
                _write_experiment_tables(root, name, exp, spec, sets, seeds, entries)
        plans = pending
        if not plans and not (run_tuning and winners is None):
            break
        if not (run_pilot and _pilot(spec, root, console) == "ran"):
            time.sleep(10)  # nothing this process can run now: another holds the runs it waits for
    while run_pilot and _pilot(spec, root, console) == "held":
        time.sleep(10)
    tables = []
    if tuning and (root / tuning["name"] / "results.md").is_file():
        tables.append(f"## {tuning['name']}\n\n{tuning.get('description', '')}\n\n"
                      f"{(root / tuning['name'] / 'results.md').read_text()}")
    for name, exp in spec["experiments"].items():  # every finished experiment, also those of other processes
        done = root / name / "results.json"
        if done.is_file():
            info = json.loads(done.read_text())
            tables.append(f"## {name}\n\n{exp.get('description', '')}\n\nseeds {info['seeds']}; overrides "
                          f"{info['sets']}\n\n{(root / name / 'results.md').read_text()}")
    res.atomic_write(root / "summary.md", "\n".join(tables))
    print("\n".join(tables))
    return root


def _resumable(run_dir: Path, cfg, session):
    """The newest complete checkpoint of an unfinished run, if `fedlora run --resume` would take it without
    --force (same config, same data, the in-process runtime); else None: the run starts again."""
    from .checkpoint import check_resume, open_for_resume

    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        ckpt, _, finished = open_for_resume(run_dir, "study")
        if check_resume(run_dir, ckpt, finished, cfg, force=False, label="study", force_hint="it starts again"):
            return None
    except UserError:  # CheckpointError among them: no checkpoint, or one of another config
        return None
    if ckpt.state.get("runtime", "in-process") != "in-process" or session.data(cfg).fingerprint != ckpt.fingerprint:
        return None
    return ckpt


def _pilot(spec: dict, root: Path, console: Console) -> str:
    """The spec's pilot study (`fedlora analyze sensitivity` with the spec's `pilot.args`, into <out>/pilot):
    "ran" (by this process, now), "done" (before), "held" (other live processes run what is left of it).

    Several processes share it seed by seed: each claims a seed (<out>/pilot.claim/seed_<s>) and runs the command
    with `--seeds <s>`; the command resumes by (seed, group) on its own. Once every seed is done, one run of the
    whole command (every group of every seed already done: no training) writes the summary over the seeds."""
    from .analysis.seeds import parse_seeds
    from .cli import main as cli_main

    if (root / res.PILOT_DONE).is_file():
        return "done"
    args = [str(a) for a in spec["pilot"]["args"]]  # YAML reads 300 and 0.1 as numbers
    at = args.index("--seeds") + 1 if "--seeds" in args else None
    seeds = parse_seeds(args[at]) if at is not None and at < len(args) else None

    def run(claim_name: str, command: list[str]) -> bool:
        """Run the command under a claim; False when another live process holds the claim."""
        if (root / STOP).exists():
            raise StudyStopped(f"study: {root / STOP} exists, so the pilot study does not go on (delete it to go on)")
        if not claim(root / "pilot.claim" / claim_name):
            return False
        console.rule("pilot: fedlora analyze sensitivity " + " ".join(command))
        code = cli_main(["analyze", "sensitivity", *command, "--out", str(root / "pilot")])
        if code != 0:
            raise UserError(f"study: the pilot study failed (exit {code}); see its error above")
        (root / "pilot.claim" / claim_name / CLAIM).unlink(missing_ok=True)
        return True

    held, ran = False, False
    for seed in seeds if seeds and len(seeds) > 1 else []:
        if (root / "pilot" / f"seed_{seed}" / "summary.json").is_file():
            continue  # this seed's every group is done
        if run(f"seed_{seed}", args[:at] + [str(seed)] + args[at + 1:]):
            ran = True
        else:
            held = True
    if held:
        return "ran" if ran else "held"
    if not run("all", args):
        return "ran" if ran else "held"
    res.atomic_write(root / res.PILOT_DONE, "finished\n")
    return "ran"


def _write_experiment_tables(root: Path, name: str, exp: dict, spec: dict, sets: list[str], seeds: list[int],
                             entries: list[tuple[str, list[str]]], partial: bool = False) -> None:
    """results.md / results.json / plots of one experiment from its runs' results files; with `partial`, of the
    methods and seeds finished so far (`study_dirs.finished_so_far`), into partial.md / partial.json /
    partial_curves.png."""
    from .cli import _aggregate_rows

    if partial and not entries:
        return
    rows, histories, by_label = [], {}, {}
    for label, _ in entries:
        results = [json.loads((root / name / label / f"seed_{seed}" / "results.json").read_text()) for seed in seeds]
        per_seed = [r["summary"] for r in results]
        by_label[label] = dict(zip(seeds, per_seed))
        agg = _aggregate_rows(per_seed)
        agg["method"] = label
        rows.append(agg)
        histories[label] = results[0]["history"]  # the curves of the first seed (results.json holds its rounds)
    table = res.results_table(rows)
    references = exp.get("paired_with", spec.get("paired_with")) or []
    references = [references] if isinstance(references, str) else list(references)
    paired_by_ref = ({ref: paired_differences(by_label, ref) for ref in references if ref in by_label}
                     if len(by_label) > 1 else {})
    for ref, paired in paired_by_ref.items():
        table += "\n" + paired_table(paired, ref, len(seeds))
    # the first reference under "paired" (the format of earlier studies), any further ones under "paired_also"
    first = next(iter(paired_by_ref), None)
    record = {"rows": rows, "seeds": seeds, "sets": sets, "paired_with": first, "paired": paired_by_ref.get(first),
              "paired_also": {r: p for r, p in paired_by_ref.items() if r != first}}
    if partial:
        res.write_json(root / name / f"{res.PARTIAL}.json", {**record, "methods_finished": list(by_label),
                                                         "methods": [method_entry(e)[0] for e in exp["methods"]],
                                                         "seeds_planned": exp.get("seeds", spec.get("seeds", [0]))})
        res.atomic_write(root / name / f"{res.PARTIAL}.md", table)
        res.plot_curves(histories, root / name / f"{res.PARTIAL}_curves.png")
        return
    res.write_json(root / name / "results.json", record)
    (root / name / "results.md").write_text(table)
    for suffix in (".json", ".md", "_curves.png"):
        (root / name / f"{res.PARTIAL}{suffix}").unlink(missing_ok=True)
    res.plot_curves(histories, root / name / "curves.png")
    res.plot_per_client(rows, root / name / "per_client_local.png", seeds)


def register(sub) -> None:
    p = sub.add_parser("study", help="run (or complete) the method study described by a spec file")
    p.add_argument("--spec", default="configs/study/study.yaml")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--quick", action="store_true", help="one seed and the spec's reduced sizes")
    p.add_argument("--only", help="comma-separated experiment names (to split a study over processes)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field in every run, e.g. --set threads=1 (repeatable)")

    p.add_argument("--publish", metavar="DIR",
                   help="run nothing: copy the finished results of --out into DIR and write the report built from "
                        "them (DIR/README.md)")
    p.add_argument("--doc", metavar="FILE", help="with --publish: also put the report between FILE's markers")

    def handler(args, console):
        only = args.only.split(",") if args.only else None
        if args.doc and not args.publish:
            raise UserError("--doc needs --publish DIR")
        if args.publish:
            from .config import load_config
            from .study_report import embed, publish

            report = publish(load_spec(args.spec), args.spec, Path(args.out), Path(args.publish),
                             lambda config, sets: load_config(config, sets + args.set))
            if args.doc:
                embed(Path(args.doc), report)
            print(report)
            return 0
        try:
            run_study(args.spec, args.out, quick=args.quick, only=only, console=console, overrides=args.set)
        except KeyError as e:
            raise UserError(f"study spec: missing key {e}") from None
        except StudyStopped as e:
            console.print(str(e), markup=False, highlight=False, soft_wrap=True)
        return 0

    p.set_defaults(handler=handler)
