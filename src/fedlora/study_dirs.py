"""A study's --out directory, shared by several processes and committed to git: who holds a run (an exclusive
claim file with the owner's pid; a dead owner's claim is taken over), which files git keeps (the records), and
what its finished runs already give (partial tables, the base model's evaluation)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import results as res
from .errors import UserError

CLAIM = ".claimed"
CLAIM_WRITE_GRACE_S = 30
"""An empty claim file younger than this is being written by its owner; an older one was left by a crash."""

RECORDS_GITIGNORE = """\
# Written by `fedlora study`. Under git, this directory keeps only the small records its tables are built from:
# a clean checkout then resumes the study where the committed records end. Checkpoints, adapters, snapshots,
# claims and metrics.jsonl (a finished run's results.json holds its rounds; an unfinished run starts again
# without its checkpoint) stay out.
*
!*/
!.gitignore
!results.json
!results.md
!config.yaml
!partial.json
!partial.md
!summary.md
!summary.json
!records.json
!pilot.json
!run_*.json
!*.png
!pilot.finished
checkpoints/
"""


def keep_records_only(root: Path) -> None:
    """Write <root>/.gitignore (once; a user's own is kept) so that committing a study's --out directory commits
    its records and nothing heavy. Outside a git work tree, or where runs/ is ignored, it changes nothing."""
    path = root / ".gitignore"
    if not path.exists():
        res.atomic_write(path, RECORDS_GITIGNORE)


def claim(run_dir: Path) -> bool:
    """Claim a run for this process (True), unless another live process holds it. A dead owner's claim is taken."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                text = path.read_text().strip()
                owner = int(text or 0)
                fresh = time.time() - path.stat().st_mtime < CLAIM_WRITE_GRACE_S
            except (OSError, ValueError):  # vanished or garbled: treated as a dead owner's
                owner, fresh, text = 0, False, ""
            if not text and fresh:
                return False  # created this instant by another process, which is writing its pid now
            if owner == os.getpid():
                return True
            if owner and alive(owner):
                return False
            path.unlink(missing_ok=True)  # the owner died: take the run over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def empty_but_claim(run_dir: Path) -> None:
    """Remove what an unfinished run left in its directory, keeping this process's claim on it (deleting the
    directory would free the run for another process in the meantime)."""
    for p in run_dir.iterdir():
        if p.name == CLAIM:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished_so_far(exp_dir: Path, exp: dict, entries: list, seeds: list[int]) -> tuple[list[int], list]:
    """(seeds, methods) of an unfinished experiment's partial tables, every method over the same seeds: with
    `order: methods_first`, the methods whose seeds are all finished; with `seeds_first`, the methods finished at
    the first seed, over the longest run of seeds that all of them have finished."""
    def done(label: str, seed: int) -> bool:
        return (exp_dir / label / f"seed_{seed}" / "results.json").is_file()

    if exp.get("order") != "seeds_first":
        return seeds, [(label, extra) for label, extra in entries if all(done(label, s) for s in seeds)]
    shown = [(label, extra) for label, extra in entries if done(label, seeds[0])]
    k = next((i for i, s in enumerate(seeds) if not all(done(label, s) for label, _ in shown)), len(seeds))
    return seeds[:k], shown


def learn_base_evals(root: Path, experiment_dir: Path, session, learned: set[Path]) -> None:
    """Give the session the base model's evaluation of every finished run of the experiment, by `base_key`.

    A run whose model, data, partition (seed) and evaluation settings match one of them then reuses that
    evaluation instead of repeating it (the same rows and greedy decoding give the same numbers; in a test run
    it is about a third of the time). `reused_from` in its `base_eval` names the run that computed it.
    """
    from .config import load_config
    from .runner import base_key

    for done in sorted(experiment_dir.glob("*/seed_*/results.json")):
        run_dir = done.parent
        if run_dir in learned or not (run_dir / "config.yaml").is_file():
            continue
        learned.add(run_dir)
        try:
            base = json.loads(done.read_text()).get("base_eval")
            key = base_key(load_config(run_dir / "config.yaml"))
        except (ValueError, UserError):  # a record this version cannot read: that run's base is not reused
            continue
        if base and key not in session.base_evals:
            origin = base.get("reused_from") or run_dir.relative_to(root).as_posix()
            session.base_evals[key] = {**base, "reused_from": origin}
