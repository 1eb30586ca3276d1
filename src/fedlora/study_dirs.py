"""A study's --out directory, shared by several processes and committed to git: who holds a run (an exclusive
claim file with the owner's pid; a dead owner's claim is taken over) and which files git keeps (the records)."""

from __future__ import annotations

import os
from pathlib import Path

from . import results as res

CLAIM = ".claimed"

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
                owner = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
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


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
