"""The pilot study over several seeds (`fedlora analyze sensitivity --seeds 0,1,2`), resumable per (seed, group),
and the mean ± standard deviation over seeds of both readings of "sensitivity".

Each seed s gives a fresh LoRA initialization (seed s) and data order (s * 1000 + group index). The layout of --out:

- pilot.json: the setup (model, data, lora, train, steps, every, perturbation); a rerun with another setup is refused;
- seed_<s>/: the one-seed report of `write_pilot_report`, plus per finished group snapshots_<group>.pt and
  run_<group>.json (losses, responses and the measures of the snapshots), the latter written last: it marks
  (s, group) as done, and a rerun skips it. The run file alone is enough to resume and report (a study commits
  it and not the snapshots), so a clean checkout redoes only the unfinished groups;
- summary.md, summary.json: over seeds.

Over seeds each per-seed value v_s (the all-groups values and ratios of both readings, per group the ratios and the
training loss) becomes mean = (1/n) Σ_s v_s and std = sqrt(Σ_s (v_s − mean)² / (n − 1)), over the n seeds where v_s
is finite (std NaN for n = 1). A ratio's mean is the mean of the per-seed ratios.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from ..errors import UserError
from .pilot import LOSS_WINDOW, GroupRun, _f, measure_runs, same_interval_direction_ratio
from .sensitivity import PAPER_RATIOS, _slug
from .sensitivity.perturb import RESPONSE

SETUP_FILE = "pilot.json"
CHANGE_KEYS = ("delta_direction_A", "delta_direction_B", "a_dir_over_b_dir",
               "delta_magnitude_A", "delta_magnitude_B", "b_mag_over_a_mag")


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2] (duplicates dropped); None when not given."""
    if text is None:
        return None
    try:
        seeds = list(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise UserError(f"--seeds: give comma-separated non-negative integers, e.g. 0,1,2 (got {text!r})") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds: give comma-separated non-negative integers, e.g. 0,1,2 (got {text!r})")
    return seeds


def setup_of(cfg, **flags) -> dict:
    """What decides a (seed, group)'s numbers: model name and dtype, data, lora, train, and the command's flags."""
    d = cfg.to_dict()
    setup = {"model": {"name": d["model"]["name"], "dtype": d["model"]["dtype"]},
             "data": d["data"], "lora": d["lora"], "train": d["train"], **flags}
    return json.loads(json.dumps(setup, default=str))


def _difference(old, new, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            d = _difference(old.get(k), new.get(k), f"{where}.{k}" if where else k)
            if d:
                return d
        return None
    return None if old == new else f"{where}: {old} there, {new} now"


def open_out(out: Path, setup: dict, overwrite: bool, *, create: bool) -> bool:
    """Check --out (create=False, before any work) or create it (create=True); True when it resumes a run.

    An --out holding pilot.json with the same setup is resumed; another setup, or other files, is refused."""
    f = out / SETUP_FILE
    if not overwrite and f.is_file():
        try:
            old = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"--out: cannot read {f} ({e}); choose another --out or pass --overwrite") from None
        diff = _difference(old, setup)
        if diff:
            raise UserError(f"--out: {out} holds a run with another setup ({diff}); rerun it with the same "
                            "setup to resume, or choose another --out or pass --overwrite")
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--out: {out} already exists and is not empty; choose another --out or pass --overwrite")
    if create:
        from .. import results as res

        res.prepare_run_dir(out, overwrite)
        f.write_text(json.dumps(setup, indent=2) + "\n", encoding="utf-8")
    return False


def _run_file(sdir: Path, group: str) -> Path:
    return sdir / f"run_{_slug(group)}.json"


def done_groups(sdir: Path, groups) -> list[str]:
    """The groups of this seed's directory whose run file exists (finished)."""
    return [g for g in groups if _run_file(sdir, g).is_file()]


def measured_record(run: GroupRun) -> dict:
    """All that the report needs of a run's snapshots (a few KiB; the snapshots are MiBs): a run loaded with it
    and no snapshots reports the same numbers."""
    return {"records": measure_runs([run]), "same_interval": same_interval_direction_ratio(run)}


def save_group(run: GroupRun, sdir: Path) -> None:
    """Snapshots, then the run file (atomically, last): a (seed, group) is done only once both are written."""
    sdir.mkdir(parents=True, exist_ok=True)
    torch.save({"group": run.group, "seed": run.seed, "snapshots": run.snapshots, "losses": run.losses},
               sdir / f"snapshots_{_slug(run.group)}.pt")
    meta = {"group": run.group, "seed": run.seed, "rows": run.rows, "seconds": run.seconds, "losses": run.losses,
            "responses": [[step, resp] for step, resp in run.responses], "measured": measured_record(run)}
    tmp = _run_file(sdir, run.group).with_suffix(".tmp")
    tmp.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    tmp.replace(_run_file(sdir, run.group))


def load_group(sdir: Path, group: str) -> GroupRun:
    """A finished (seed, group) from its run file, with its snapshots where they exist, else with the measures
    the run file holds (the snapshots are not committed)."""
    meta = json.loads(_run_file(sdir, group).read_text(encoding="utf-8"))
    pt = sdir / f"snapshots_{_slug(group)}.pt"
    snapshots = [(int(s), d) for s, d in torch.load(pt, weights_only=True)["snapshots"]] if pt.is_file() else []
    if not snapshots and not meta.get("measured"):
        raise UserError(f"{_run_file(sdir, group)}: finished, but neither its snapshots ({pt.name}) nor its measures "
                        "are there; delete the run file to redo this group")
    return GroupRun(group=group, snapshots=snapshots, losses=meta["losses"], rows=meta["rows"],
                    seconds=meta["seconds"], seed=meta["seed"], measured=None if snapshots else meta["measured"],
                    responses=[(int(step), resp) for step, resp in meta["responses"]])


def seed_values(summary: dict) -> dict[str, float]:
    """The scalars of one seed's `pilot_summary` that are averaged over seeds, as {"reading/where/axis/key": value}."""
    v: dict[str, float] = {}
    for axis, vals in summary["overall"].items():
        v.update({f"change/all/{axis}/{k}": vals[k] for k in CHANGE_KEYS})
    for axis, vals in (summary.get("overall_responses") or {}).items():
        v.update({f"response/all/{axis}/{k}": x for k, x in vals.items()})
    for g, gv in summary["groups"].items():
        for axis, vals in gv["axes"].items():
            v.update({f"change/{g}/{axis}/{k}": vals[k] for k in ("a_dir_over_b_dir", "b_mag_over_a_mag")})
        for axis, vals in (gv["responses"] or {}).get("axes", {}).items():
            v.update({f"response/{g}/{axis}/{k}": vals[k] for k in ("a_dir_over_b_dir", "b_mag_over_a_mag")})
        v[f"loss/{g}/first"], v[f"loss/{g}/last"] = gv["loss_first"], gv["loss_last"]
        if gv["responses"]:
            v[f"loss/{g}/heldout_final"] = gv["responses"]["base_loss"]
    return v


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, dict]:
    """{key: {mean, std, n, values: {seed: value}}} over the seeds where the value is finite."""
    keys = list(dict.fromkeys(k for vals in per_seed.values() for k in vals))
    out = {}
    for k in keys:
        vals = {s: v[k] for s, v in per_seed.items() if v.get(k) is not None and math.isfinite(v[k])}
        xs = list(vals.values())
        out[k] = {"mean": statistics.fmean(xs) if xs else math.nan,
                  "std": statistics.stdev(xs) if len(xs) > 1 else math.nan,
                  "n": len(xs), "values": {str(s): x for s, x in vals.items()}}
    return out


def _pm(agg: dict, key: str) -> str:
    a = agg.get(key)
    if a is None or not a["n"]:
        return "–"
    return _f(a["mean"]) if a["n"] == 1 else f"{_f(a['mean'])} ± {_f(a['std'])}"


def main_table(agg: dict, rho: float | None) -> list[str]:
    """Both readings' all-groups ratios next to the paper's, as Markdown rows."""
    lines = ["| reading | axis | A-dir : B-dir | B-mag : A-mag |", "|---|---|---|---|"]
    readings = [("change during training (ΔD, ΔM)", "change")]
    if rho is not None:
        readings.append((f"loss response to a perturbation, ρ = {rho:g}", "response"))
    for label, reading in readings:
        for axis in ("rows", "cols"):
            if f"{reading}/all/{axis}/a_dir_over_b_dir" in agg:
                lines.append(f"| {label} | {axis} | {_pm(agg, f'{reading}/all/{axis}/a_dir_over_b_dir')} "
                             f"| {_pm(agg, f'{reading}/all/{axis}/b_mag_over_a_mag')} |")
    p = PAPER_RATIOS
    lines.append(f"| paper (LLaMA2-7B, Dolly) | not stated | {p['a_dir_over_b_dir']} | {p['b_mag_over_a_mag']:g} |")
    return lines


def seeds_markdown(agg: dict, seeds: list[int], groups: list[str], rho: float | None, command: str = "") -> str:
    n = len(seeds)
    lines = [f"# Pilot study over {n} seed(s): {', '.join(map(str, seeds))}", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += ["Values at the final step, averaged over the task groups per seed; then mean ± sample std over the "
              "seeds (a ratio: the mean of the per-seed ratios). Per seed: `seed_<s>/summary.md`.", "",
              "## Both readings next to the paper", "", *main_table(agg, rho), "",
              "## Change during training (DoRA's measure)", "",
              "| axis | ΔD_A | ΔD_B | ΔM_A | ΔM_B |", "|---|---|---|---|---|"]
    for axis in ("rows", "cols"):
        lines.append(f"| {axis} | " + " | ".join(_pm(agg, f"change/all/{axis}/{k}") for k in
                                                   ("delta_direction_A", "delta_direction_B",
                                                    "delta_magnitude_A", "delta_magnitude_B")) + " |")
    if rho is not None:
        lines += ["", "## Loss response to a matched perturbation", "", f"Measure: {RESPONSE}", "",
                  "| axis | S_dir A | S_dir B | S_mag A | S_mag B |", "|---|---|---|---|---|"]
        for axis in ("rows", "cols"):
            lines.append(f"| {axis} | " + " | ".join(_pm(agg, f"response/all/{axis}/{k}") for k in
                                                       ("S_dir_A", "S_dir_B", "S_mag_A", "S_mag_B")) + " |")
    lines += ["", "## Per task group: the ratios", "",
              "| task group | axis | change A:B dir | change B:A mag | response A:B dir | response B:A mag |",
              "|---|---|---|---|---|---|"]
    for g in groups:
        for axis in ("rows", "cols"):
            lines.append(f"| {g} | {axis} | " + " | ".join(
                _pm(agg, f"{r}/{g}/{axis}/{k}") for r in ("change", "response")
                for k in ("a_dir_over_b_dir", "b_mag_over_a_mag")) + " |")
    lines += ["", "## Has the training loss fallen?", "",
              f"| task group | loss, first {LOSS_WINDOW} steps | loss, last {LOSS_WINDOW} steps "
              "| held-out loss, final step |", "|---|---|---|---|"]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(_pm(agg, f"loss/{g}/{k}") for k in ("first", "last", "heldout_final"))
                     + " |")
    return "\n".join(lines) + "\n"


def write_seeds_report(out: Path, per_seed: dict[int, dict[str, float]], groups: list[str], rho: float | None,
                       command: str = "") -> dict:
    """summary.json (per-seed values, mean ± std) and summary.md over seeds in `out`; return the aggregate."""
    agg = aggregate(per_seed)
    seeds = sorted(per_seed)
    (out / "summary.json").write_text(json.dumps(
        {"seeds": seeds, "groups": groups, "rho": rho, "paper": dict(PAPER_RATIOS), "response_measure": RESPONSE,
         "per_seed": {str(s): per_seed[s] for s in seeds}, "aggregate": agg}, indent=1) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(seeds_markdown(agg, seeds, groups, rho, command), encoding="utf-8")
    return agg
