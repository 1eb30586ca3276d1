"""The paper's pilot study: plain LoRA fine-tuned separately on several task groups, snapshotted every k steps.

For each task group (a Dolly category, or a Natural Instructions task) a fresh LoRA adapter (the
same seeded initialization for every group) is trained for `steps` optimizer steps on that group
alone; A and B are copied at step 0 and every `every` steps (and at the last step). The measures
of `fedlora.analysis.sensitivity` then say how much each factor changed in direction and in
magnitude, and `write_pilot_report` writes the tables and plots. With a `PerturbSpec`, rows held
out of each group measure the second reading: the loss response to a direction-only or
magnitude-only perturbation of each factor (`fedlora.analysis.sensitivity.perturb`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import AdapterModel
from ..data.examples import Example
from ..data.prompts import IGNORE, PromptFormatter
from ..errors import DataError, UserError
from ..training import collate, phase_rng, response_loss, sample_batches
from .sensitivity import AXES, MEASURE, PAPER_RATIOS, measure_snapshots, summarize, write_report
from .sensitivity.perturb import RESPONSE, loss_response, response_ratios

RESPONSE_KEYS = ("S_dir_A", "S_dir_B", "a_dir_over_b_dir", "S_mag_A", "S_mag_B", "b_mag_over_a_mag")

DEFAULT_NUM_GROUPS = 4
LOSS_WINDOW = 5  # the summary's training loss: mean over the first and over the last 5 steps

Snapshot = tuple[int, dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# the task groups


def parse_groups(text: str | None) -> list[str] | None:
    """`--groups a,b,c` -> ["a", "b", "c"] (duplicates dropped); None when not given."""
    if text is None:
        return None
    groups = list(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))
    if not groups:
        raise UserError("--groups: give at least one task group (comma-separated)")
    return groups


def load_group_examples(cfg, groups: list[str] | None, warn: Callable[[str], None] = print) -> dict[str, list[Example]]:
    """{group: its examples} for the named groups (labels: Dolly categories or NI task names).

    Without `groups`: for Dolly/JSON the DEFAULT_NUM_GROUPS largest labels; for Natural
    Instructions DEFAULT_NUM_GROUPS tasks from different categories (seeded), never an official
    test task.
    """
    if cfg.data.source == "natural_instructions":
        return _ni_groups(cfg, groups, warn)
    from ..data.federated import load_examples

    examples, _ = load_examples(cfg, warn)
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    if groups is None:
        counts = Counter({lab: len(v) for lab, v in by_label.items()})
        groups = sorted(lab for lab, _ in counts.most_common(DEFAULT_NUM_GROUPS))
    unknown = [g for g in groups if g not in by_label]
    if unknown:
        raise UserError(f"--groups: unknown task group(s) {', '.join(unknown)}; the data has: "
                        f"{', '.join(sorted(by_label))}")
    return {g: by_label[g] for g in groups}


def _ni_groups(cfg, groups: list[str] | None, warn) -> dict[str, list[Example]]:
    from ..data.natural_instructions import group_tasks_by_category, load_ni_task_categories, load_ni_tasks
    from ..data.natural_instructions_source import is_hub_id, ni_path, official_test_split

    d, path = cfg.data, ni_path(cfg)
    if is_hub_id(path):
        if groups is None:
            raise UserError("--groups: name the Natural Instructions tasks to study when loading from the hub")
        from ..data.natural_instructions import load_ni_from_hub

        return load_ni_from_hub(path, tasks=groups, max_instances_per_task=d.max_instances_per_task,
                                seed=cfg.seed, warn=warn)
    if groups is None:
        categories = load_ni_task_categories(path, warn=lambda _m: None)
        reserved = set(official_test_split(path) or ())
        candidates = {t: c for t, c in categories.items() if t not in reserved} or categories
        n = min(DEFAULT_NUM_GROUPS, len(candidates))
        groups = sorted(t for g in group_tasks_by_category(candidates, 1, n, cfg.seed) for t in g)
    try:
        return load_ni_tasks(path, tasks=groups, max_instances_per_task=d.max_instances_per_task,
                             num_positive_examples=d.num_positive_examples, seed=cfg.seed, warn=warn)
    except DataError as e:
        raise UserError(f"--groups: {e}") from None


# ---------------------------------------------------------------------------------------------
# fine-tuning one group


@dataclass
class GroupRun:
    group: str
    snapshots: list[Snapshot]
    losses: list[float] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    seed: int = 0
    responses: list[tuple[int, dict]] = field(default_factory=list)  # (step, loss_response(...)) per measured step
    # the measures of the snapshots, when the run was loaded from its record without them (`measured_record`)
    measured: dict | None = None


@dataclass(frozen=True)
class PerturbSpec:
    """The second reading: `heldout` rows per group held out of training, perturbation size `rho`, `draws`
    draws, measured at the final snapshot (`at="final"`) or at every snapshot (`at="all"`)."""
    heldout: int = 16
    rho: float = 0.1
    draws: int = 4
    at: str = "final"


def split_heldout(examples: list[Example], n: int, group: str) -> tuple[list[Example], list[Example]]:
    """(n rows held out, the rest); the held-out rows depend only on the group, so every seed uses the same."""
    if n <= 0:
        return [], list(examples)
    if n >= len(examples):
        raise UserError(f"--heldout: task group {group!r} has {len(examples)} rows; hold out fewer")
    held = set(random.Random(f"heldout/{group}").sample(range(len(examples)), n))
    return [e for i, e in enumerate(examples) if i in held], [e for i, e in enumerate(examples) if i not in held]


def measure_responses(am: AdapterModel, fmt: PromptFormatter, heldout: list[Example], snapshots: list[Snapshot],
                      spec: PerturbSpec, batch_size: int, seed: int) -> list[tuple[int, dict]]:
    """The loss response of each factor at the final snapshot (or every one), the adapter loaded with it."""
    encoded = [fmt.encode(e) for e in heldout]
    batches = [collate(encoded[j:j + batch_size], fmt.tok.pad_token_id, am.device)
               for j in range(0, len(encoded), batch_size)]
    chosen = snapshots if spec.at == "all" else snapshots[-1:]
    out = []
    for step, snap in chosen:
        am.load_state(snap)
        out.append((step, loss_response(am, batches, rho=spec.rho, draws=spec.draws, seed=seed)))
    return out


def lora_snapshot(am: AdapterModel) -> dict[str, torch.Tensor]:
    """A CPU float32 copy of every lora_A / lora_B weight of the adapter."""
    return {n: p.detach().float().cpu().clone() for n, p in am.params.items() if ".lora_" in n}


def finetune_group(am: AdapterModel, fmt: PromptFormatter, examples: list[Example], *, steps: int, every: int,
                   train_cfg, seed: int, on_step: Callable[[int, float], None] | None = None) -> GroupRun:
    """Train A and B of `am` (plain LoRA, freshly initialized) for `steps` AdamW steps; snapshot A and B
    at step 0, every `every` steps and at the last step. Constant learning rate `train_cfg.lr`."""
    t = train_cfg
    need = steps * t.batch_size * t.grad_accum
    rows = examples if len(examples) <= need else random.Random(seed).sample(examples, need)
    encoded = [fmt.encode(e) for e in rows]
    batches = sample_batches(encoded, steps, t.batch_size, t.grad_accum, phase_rng(seed, 0x5E45))
    groups = am.set_trainable(["A", "B"])
    params = [p for ps in groups.values() for p in ps]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    pad = fmt.tok.pad_token_id

    run = GroupRun(group="", snapshots=[(0, lora_snapshot(am))], rows=len(encoded))
    torch.manual_seed(seed)
    am.model.train()
    for step, micro_batches in enumerate(batches, start=1):
        encoded_mb = [collate(mb, pad, am.device) for mb in micro_batches]
        tokens = max(1, sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in encoded_mb))
        loss_value = 0.0
        for b in encoded_mb:
            loss_sum, _ = response_loss(am, b)
            (loss_sum / tokens).backward()
            loss_value += float(loss_sum.detach())
        if not math.isfinite(loss_value):
            raise UserError(f"the loss became {loss_value} at step {step}; lower train.lr")
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.losses.append(loss_value / tokens)
        if step % every == 0 or step == steps:
            run.snapshots.append((step, lora_snapshot(am)))
        if on_step:
            on_step(step, loss_value / tokens)
    am.model.eval()
    am.set_trainable(())
    return run


def run_pilot(cfg, tokenizer, base_model, group_examples: dict[str, list[Example]], *, steps: int, every: int,
              perturb: PerturbSpec | None = None, done: Collection[str] = (),
              on_start: Callable[[str], None] | None = None,
              on_step: Callable[[int, float], None] | None = None,
              on_done: Callable[[GroupRun], None] | None = None) -> tuple[list[GroupRun], object]:
    """Fine-tune a fresh LoRA (init from cfg.seed) on each group in turn, skipping the groups in `done` (each group
    keeps its data-order seed cfg.seed * 1000 + its index); return the runs and the (clean) base model."""
    if steps < 1:
        raise UserError(f"--steps: must be at least 1 (got {steps})")
    if every < 1:
        raise UserError(f"--every: must be at least 1 (got {every})")
    fmt = PromptFormatter(tokenizer, cfg.data.template, cfg.data.max_length)
    runs = []
    for i, (group, examples) in enumerate(group_examples.items()):
        if not examples:
            raise UserError(f"task group {group!r} has no examples")
        if group in done:
            continue
        heldout, examples = split_heldout(examples, perturb.heldout if perturb else 0, group)
        if on_start:
            on_start(group)
        t0 = time.perf_counter()
        am = AdapterModel(base_model, "lora", cfg.lora, seed=cfg.seed, base_name=cfg.model.name)
        try:
            run = finetune_group(am, fmt, examples, steps=steps, every=every, train_cfg=cfg.train,
                                 seed=cfg.seed * 1000 + i, on_step=on_step)
            if perturb:
                run.responses = measure_responses(am, fmt, heldout, run.snapshots, perturb,
                                                  cfg.train.batch_size, seed=cfg.seed)
        finally:
            base_model = am.release()
        run.group, run.seconds, run.seed = group, time.perf_counter() - t0, cfg.seed
        runs.append(run)
        if on_done:
            on_done(run)
    return runs, base_model


# ---------------------------------------------------------------------------------------------
# measures and the report


def measure_runs(runs: list[GroupRun]) -> list[dict]:
    records = []
    for run in runs:
        records += (run.measured["records"] if run.measured is not None
                    else measure_snapshots(run.snapshots, axes=AXES, group=run.group))
    return records


def same_interval_direction_ratio(run: GroupRun) -> dict[str, float]:
    """A-dir : B-dir with A also measured from the first snapshot after step 0 (B's reference), per axis.

    B's direction is undefined at step 0, so the main measure compares B from its first non-zero
    snapshot but A from step 0. This check puts both on the same interval."""
    if run.measured is not None:
        return run.measured["same_interval"]
    later = [s for s in run.snapshots if s[0] > 0]
    if len(later) < 2:
        return {axis: math.nan for axis in AXES}
    s = summarize(measure_snapshots(later, axes=AXES, group=run.group))
    return {axis: v["a_dir_over_b_dir"] for axis, v in s["axes"].items()}


FIELDS = ("delta_direction_A", "delta_direction_B", "delta_magnitude_A", "delta_magnitude_B",
          "relative_delta_magnitude_A", "relative_delta_magnitude_B")


def pilot_summary(runs: list[GroupRun], records: list[dict]) -> dict:
    """Per group and axis the final-step values and the paper's two ratios; and over all groups
    (each value averaged over groups, then the ratios of those means)."""
    per_group = {}
    for run in runs:
        s = summarize(records, group=run.group)
        same = same_interval_direction_ratio(run)
        per_group[run.group] = {
            "step": s["step"],
            "rows": run.rows,
            "loss_first": _mean(run.losses[:LOSS_WINDOW]),
            "loss_last": _mean(run.losses[-LOSS_WINDOW:]),
            "seconds": run.seconds,
            "axes": {axis: {**v, "a_dir_over_b_dir_same_interval": same.get(axis, math.nan)}
                     for axis, v in s["axes"].items()},
            "by_layer_type": s["by_layer_type"],
            "responses": final_response(run),
        }
    overall = {}
    for axis in AXES:
        vals = [g["axes"][axis] for g in per_group.values() if axis in g["axes"]]
        if not vals:
            continue
        mean = {f: sum(v[f] for v in vals) / len(vals) for f in FIELDS}
        mean["a_dir_over_b_dir"] = _ratio(mean["delta_direction_A"], mean["delta_direction_B"])
        mean["b_mag_over_a_mag"] = _ratio(mean["delta_magnitude_B"], mean["delta_magnitude_A"])
        same = [v["a_dir_over_b_dir_same_interval"] for v in vals if not math.isnan(v["a_dir_over_b_dir_same_interval"])]
        mean["a_dir_over_b_dir_same_interval_mean"] = sum(same) / len(same) if same else math.nan
        overall[axis] = mean
    finals = [r for run in runs if run.responses for r in run.responses[-1][1]["records"]]
    return {"measure": MEASURE, "paper": dict(PAPER_RATIOS), "groups": per_group, "overall": overall,
            "overall_responses": response_ratios(finals) if finals else None}


def final_response(run: GroupRun) -> dict | None:
    """The second reading at the run's last measured snapshot: its step, held-out loss and S / ratios per axis."""
    if not run.responses:
        return None
    step, resp = run.responses[-1]
    return {"step": step, "base_loss": resp["base_loss"], "rho": resp["rho"], "draws": resp["draws"],
            "axes": response_ratios(resp["records"])}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _f(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.4g}"


def summary_markdown(summary: dict, command: str = "") -> str:
    p = summary["paper"]
    lines = ["# Pilot study: how LoRA's A and B change in direction and magnitude", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [f"Measure: {summary['measure']}", ""]
    lines += [
        "## The paper's two ratios at the final step",
        "",
        f"Paper: A-direction : B-direction ≈ {p['a_dir_over_b_dir']}, B-magnitude : A-magnitude ≈ "
        f"{p['b_mag_over_a_mag']:g} (axis not stated). \"all groups\" averages each value over the groups, "
        "then takes the ratio. \"A:B dir, same interval\" measures A from the same snapshot as B "
        "(the first one after step 0) instead of from step 0.",
        "",
        "| task group | axis | ΔD_A | ΔD_B | A-dir : B-dir | A:B dir, same interval | ΔM_A | ΔM_B | B-mag : A-mag "
        "| rel ΔM_A | rel ΔM_B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(g, v["axes"]) for g, v in summary["groups"].items()]
    rows.append(("**all groups**", {
        a: {**v, "a_dir_over_b_dir_same_interval": v["a_dir_over_b_dir_same_interval_mean"]}
        for a, v in summary["overall"].items()}))
    for g, axes in rows:
        for axis, v in axes.items():
            lines.append(
                f"| {g} | {axis} | {_f(v['delta_direction_A'])} | {_f(v['delta_direction_B'])} "
                f"| {_f(v['a_dir_over_b_dir'])} | {_f(v['a_dir_over_b_dir_same_interval'])} "
                f"| {_f(v['delta_magnitude_A'])} | {_f(v['delta_magnitude_B'])} | {_f(v['b_mag_over_a_mag'])} "
                f"| {_f(v['relative_delta_magnitude_A'])} | {_f(v['relative_delta_magnitude_B'])} |"
            )
    if summary.get("overall_responses"):
        lines += ["", "## Second reading: loss response to a matched perturbation (final snapshot)", "",
                  f"Measure: {RESPONSE} \"all groups\" averages each S over the groups, then takes the ratio.", "",
                  "| task group | axis | S_dir A | S_dir B | A-dir : B-dir | S_mag A | S_mag B | B-mag : A-mag |",
                  "|---|---|---|---|---|---|---|---|"]
        rows = [(g, v["responses"]["axes"]) for g, v in summary["groups"].items() if v["responses"]]
        for g, axes in rows + [("**all groups**", summary["overall_responses"])]:
            lines += [f"| {g} | {axis} | " + " | ".join(_f(v[k]) for k in RESPONSE_KEYS) + " |"
                      for axis, v in axes.items()]
    lines += ["", "## Training", "", f"| task group | steps | rows used | loss, first {LOSS_WINDOW} steps "
              f"| loss, last {LOSS_WINDOW} steps | seconds |",
              "|---|---|---|---|---|---|"]
    for g, v in summary["groups"].items():
        lines.append(f"| {g} | {v['step']} | {v['rows']} | {_f(v['loss_first'])} | {_f(v['loss_last'])} "
                     f"| {v['seconds']:.0f} |")
    lines += ["", "Per layer type, per step and per group: `sensitivity_all_groups.md` and "
              "`sensitivity_<group>.md`; plots: `sensitivity_<group>_<axis>.png`.", ""]
    return "\n".join(lines)


def write_pilot_report(runs: list[GroupRun], out_dir: str | Path, command: str = "") -> tuple[dict, list[Path]]:
    """Write the summary (summary.md, summary.json), the records (records.json), the combined tables
    (sensitivity_all_groups.md) and per group its tables and plots; return the summary and the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = measure_runs(runs)
    summary = pilot_summary(runs, records)
    paths = [out / "summary.md", out / "summary.json", out / "records.json"]
    paths[0].write_text(summary_markdown(summary, command), encoding="utf-8")
    paths[1].write_text(json.dumps(summary, indent=2, default=_json_default) + "\n", encoding="utf-8")
    paths[2].write_text(json.dumps(records, indent=1, default=_json_default) + "\n", encoding="utf-8")
    combined = write_report(records, out, "all_groups")
    paths.append(combined[0])  # the combined plots would mix the groups; keep only the tables
    for p in combined[1:]:
        p.unlink()
    for run in runs:
        paths += write_report([r for r in records if r["group"] == run.group], out, run.group)
    return summary, paths


def _json_default(x):
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)
