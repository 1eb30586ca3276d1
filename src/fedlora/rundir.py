"""The one writer of a run directory, and the loop that drives a `RoundEngine` through a whole run.

A run directory holds: `config.yaml` (resolved), `metrics.jsonl` (one line per round), `checkpoints/`
(the newest two, for resume: a checkpoint of round r is taken after round r's aggregation, with round r's
local phase still to run; the last one after the closing exchange), and once the run finished `results.md`, `curves.png`, `adapters/global/`
(the server's global model as a plain PEFT adapter) and `global_state.pt`, the clients' local adapters
where the runtime has them (`adapters/clients/client_N/`, `personal_state.pt`), and last `results.json`,
whose presence means the run finished. Every runtime writes it through `run_engine`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import results as res
from .checkpoint import Checkpoint, CheckpointError, CheckpointStore, is_due
from .config import dump_config
from .engine import RoundEngine, RoundRecord, global_model_note
from .model import base_model_id

Say = Callable[[str], None]


def round_line(rec: RoundRecord) -> str:
    s = f"round {rec.round}: train loss {rec.train_loss:.4f}"
    if rec.local_phase_loss is not None:
        s += f", local-phase loss {rec.local_phase_loss:.4f}"
    s += f", {rec.examples} examples, up {rec.bytes_up / 1024:.1f} KiB/client, {rec.wall_time:.1f}s"
    if rec.eval:
        s += " | " + eval_line(rec.eval)
    if rec.rejected:
        s += f" | rejected: {sorted(rec.rejected)}"
    if rec.failed:
        s += f" | failed: {sorted(int(c) for c in rec.failed)}"
    if getattr(rec, "privacy", None):
        s += f" | DP ε {rec.privacy['epsilon']:.3f} (δ {rec.privacy['delta']:g})"
    return s


def eval_line(ev: dict) -> str:
    parts = []
    for scope in ("global", "local"):
        s = f"{scope} loss {ev[scope]['loss']:.4f}"
        if ev[scope]["rouge_l"] is not None:
            s += f" R-L {ev[scope]['rouge_l']:.4f}"
        parts.append(s)
    return " | ".join(parts)


def run_engine(engine: RoundEngine, out: Path, data, *, resume: Checkpoint | None = None, say: Say = print,
               provenance: dict | None = None, on_round: Callable[[RoundRecord], None] | None = None,
               am=None, base: dict | None = None) -> dict:
    """Evaluate the base model, run the rounds after `resume` (or all), write the run directory; the summary row.

    `base`: the base model's evaluation when it is already known (the same data, seed and evaluation settings).

    With `resume` (a checkpoint of this run directory, already checked against the config and the data) the
    engine's state, metrics.jsonl and the round counter are restored first; a checkpoint that does not fit
    changes nothing on disk. A checkpoint is written every `output.checkpoint_every` rounds and after the last.
    """
    cfg = engine.cfg
    t0 = time.perf_counter()
    elapsed_before = resume.elapsed if resume else 0.0
    config_yaml = dump_config(cfg)
    store = CheckpointStore(out)
    lines: list[str] = []
    if resume is not None:
        if resume.state.get("runtime", "in-process") != engine.transport.runtime:
            raise CheckpointError(f"resume: {resume.path} was written by the {resume.state.get('runtime')} runtime, "
                                  f"not {engine.transport.runtime}; resume it there (see docs/reliability.md)")
        lines = list(resume.metrics)
        try:
            engine.load_state_dict(resume.state, [RoundRecord.from_dict(json.loads(x)) for x in lines])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"resume: checkpoint {resume.path.name} does not fit this config: {e}") from None
        say(f"resuming after round {resume.round} of {cfg.federation.rounds} "
            f"(checkpoint {resume.path.relative_to(out)})")
        store.prune()  # leftovers of the crash: torn temporary checkpoints, a checkpoint too many
    res.atomic_write(out / "config.yaml", config_yaml)
    metrics_path = out / "metrics.jsonl"
    res.atomic_write(metrics_path, "".join(lines))
    if base is not None:
        engine.base_eval = base
    engine.want_base = engine.base_eval is None  # evaluated in round 1's exchange

    def show_base(ev: dict) -> None:
        say("base model (no adapter, before round 1) | " + eval_line(ev))

    def record(rec: RoundRecord) -> None:
        line = json.dumps(rec.as_dict(), default=float) + "\n"
        lines.append(line)
        with open(metrics_path, "a") as f:
            f.write(line)
        say(round_line(rec))
        if on_round:
            on_round(rec)

    def checkpoint(rnd: int) -> None:
        if is_due(rnd, cfg.federation.rounds, cfg.output.checkpoint_every):
            store.save(rnd, engine.state_dict(), lines, config_yaml, data.fingerprint,
                       elapsed_before + time.perf_counter() - t0)

    engine.on_base = show_base
    start = resume.round + 1 if resume else 1
    engine.run(on_round=record, start_round=start, on_checkpoint=checkpoint)
    base = engine.base_eval
    history = [json.loads(x) for x in lines]
    wall = elapsed_before + time.perf_counter() - t0
    row = res.summary_row(cfg.method, history, engine.parameter_counts(), wall)
    base_row = res.base_row(base)
    note = global_model_note(engine.method)
    privacy = res.privacy_summary(history)  # None when DP is off: nothing written
    (out / "results.md").write_text(res.results_table([base_row, row]) + (f"\nGlobal model: {note}.\n" if note else "")
                                    + (res.privacy_line(privacy) if privacy else ""))
    if cfg.output.plots:
        res.plot_curves({cfg.method: history}, out / "curves.png", base=base)
    if cfg.output.save_adapters:
        write_adapters(engine, out, am, data=data, base=base)
    # written last: its presence means the run finished (see `fedlora run --resume`)
    res.write_json(out / "results.json", {
        "summary": row, "base": base_row, "base_eval": base, "history": history, "method": engine.method.summary,
        **({"privacy": privacy} if privacy else {}),
        "provenance": res.provenance(cfg, data, {"wall_time": wall, "runtime": engine.transport.runtime,
                                                 "resumed": bool(resume), **(provenance or {})}),
    })
    return {**row, "base": base_row}


def write_adapters(engine: RoundEngine, out: Path, am, *, data=None, base: dict | None = None) -> None:
    """adapters/global/: exactly the server's state; adapters/clients/: local models where the runtime has them;
    in each a model card (README.md: method, round, data, base model, scores)."""
    adapters = out / "adapters"
    am.export_peft(engine.server.global_state, adapters / "global", card=model_card(engine, data, base, None))
    torch.save({k: v.detach().cpu() for k, v in engine.server.global_state.items()}, out / "global_state.pt")
    engine.transport.export_local(adapters, engine.server.shared_state())
    for d in sorted((adapters / "clients").glob("client_*")):
        am.write_card(d, model_card(engine, data, base, int(d.name.removeprefix("client_"))))


def model_card(engine: RoundEngine, data, base: dict | None, cid: int | None) -> str:
    """The body of an exported adapter's README.md: what it is and how well it did, nothing that varies by run."""
    cfg, m = engine.cfg, engine.method
    last = next((r for r in reversed(engine.history) if r.eval), None)
    rnd = engine.history[-1].round if engine.history else 0
    if cid is None:
        what, rows = "the server's global model", "the global test set, every label weighted equally"
        note = global_model_note(m)
        scores = last.eval["global"] if last else None
        base_scores = base["global"] if base else None
    else:
        what, rows, note = f"client {cid}'s local model (the global model with its personal components)", \
            f"client {cid}'s own held-out rows", None
        scores = _client_scores(last.eval if last else None, cid)
        base_scores = _client_scores(base, cid)
    lines = [f"# {cfg.method}: {'global' if cid is None else f'client {cid}'} adapter after round {rnd}", "",
             "A LoRA adapter trained with fedlora (federated LoRA fine-tuning).", "",
             f"- method: `{cfg.method}` ({m.summary})" if m.summary else f"- method: `{cfg.method}`",
             f"- adapter: {what}" + (f"; {note}" if note else ""),
             f"- round: {rnd} of {cfg.federation.rounds}",
             f"- base model: {base_model_id(cfg.model.name)}",
             f"- data: `{cfg.data.path}` ({cfg.data.source}" + (f", fingerprint {data.fingerprint}" if data else "")
             + f"), {cfg.federation.clients} clients, {cfg.data.partition} partition, seed {cfg.seed}"]
    if scores:
        line = f"- scores after round {last.round} on {rows}: {_score(scores)}"
        lines.append(line + (f"; the base model on the same rows: {_score(base_scores)}" if base_scores else ""))
    lines += ["", "Load it with `PeftModel.from_pretrained(base_model, this_directory)`, or "
              "`AutoPeftModelForCausalLM.from_pretrained(this_directory)` where the base model resolves.", ""]
    return "\n".join(lines)


def _client_scores(ev: dict | None, cid: int) -> dict | None:
    rows = (ev or {}).get("local", {}).get("per_client", [])
    return rows[cid] if cid < len(rows) and rows[cid].get("loss") is not None else None


def _score(s: dict) -> str:
    return f"loss {s['loss']:.4f}" + (f", ROUGE-L {s['rouge_l']:.4f}" if s.get("rouge_l") is not None else "")
