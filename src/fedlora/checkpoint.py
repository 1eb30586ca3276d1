"""Checkpoints in a run directory: written atomically, verified on load, so a kill -9 at any point loses at most
the rounds since the last checkpoint and a torn checkpoint is never loaded.

Layout (one directory per checkpoint, the newest `KEEP` kept):

    RUN_DIR/checkpoints/round-000003/
        state.pt        tensors and counters (`torch.save`; loaded with `weights_only=True`)
        metrics.jsonl   the run's metrics.jsonl up to and including this round
        config.yaml     the resolved config the state belongs to
        manifest.json   written last: round, data fingerprint, elapsed wall time, sha256 + size of each file

A checkpoint is built in a hidden temporary directory (`.round-000003.tmp`): every file is written
and fsynced, the manifest last, then the directory is renamed into place and its parent fsynced.
Loading ignores temporary directories and checks every file against the manifest's hashes; a
checkpoint that fails any check is skipped in favour of an older complete one.

Nothing here knows the simulator: `state` is any nest of dicts/lists of tensors, numbers and
strings, so a Flower ServerApp can store `Server.state_dict()` and its round counter the same way
(`CheckpointStore(run_dir).save(...)` / `.latest()`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

FORMAT = 1
KEEP = 2
DIRNAME = "checkpoints"
FAULT_ENV = "FEDLORA_FAULT"
_NAME = re.compile(r"^round-(\d{6})$")


class CheckpointError(UserError):
    """A run directory cannot be resumed (no complete checkpoint, or one that does not fit): one clear line."""


@dataclass
class Checkpoint:
    round: int
    state: dict
    metrics: list[str]
    """The metrics.jsonl lines (each ending in a newline) up to and including `round`."""
    config_yaml: str
    fingerprint: str
    elapsed: float
    """Wall time of the run so far (all its processes), seconds."""
    path: Path


def fault_point(name: str, rnd: int) -> None:
    """Test hook: SIGKILL this very process when FEDLORA_FAULT names this point, e.g. `checkpoint@2` or `train@3`.

    Used by the crash-resume tests to die at exact places (a real kill -9: no cleanup, no atexit).
    `FEDLORA_FAULT=@FILE` reads the point from FILE at each call, for a process (a Flower ServerApp)
    whose environment was fixed before the test knew where it should die.
    """
    want = os.environ.get(FAULT_ENV)
    if want and want.startswith("@"):  # `@FILE`: the point is read from FILE now (for processes started earlier)
        try:
            want = Path(want[1:]).read_text().strip()
        except OSError:
            return
    if want and want == f"{name}@{rnd}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointStore:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep: int = KEEP):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / DIRNAME
        self.keep = max(1, keep)

    # ------------------------------------------------------------------ writing
    def save(self, rnd: int, state: dict, metrics: list[str], config_yaml: str, fingerprint: str,
             elapsed: float) -> Path:
        """Write the checkpoint of round `rnd` atomically; then drop all but the newest `keep` ones."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"round-{rnd:06d}"
        tmp = self.dir / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        state_path = tmp / "state.pt"
        with open(state_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _write(tmp / "metrics.jsonl", "".join(metrics).encode())
        _write(tmp / "config.yaml", config_yaml.encode())
        fault_point("checkpoint", rnd)  # the files are written, the manifest is not: a torn checkpoint
        files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "round": rnd, "fingerprint": fingerprint, "elapsed": elapsed,
                    "written": time.time(), "files": files}
        _write(tmp / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
        _fsync_dir(tmp)
        final = self.dir / name
        if final.exists():  # a re-run of a round after resuming from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        fault_point("checkpoint-committed", rnd)
        self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest `keep` checkpoints; remove temporary leftovers of earlier crashes."""
        for p in self._committed()[self.keep:]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.temporary():
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ reading
    def _committed(self) -> list[Path]:
        """Checkpoint directories by name, newest first (not yet verified)."""
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir() if p.is_dir() and _NAME.match(p.name)), reverse=True)

    def temporary(self) -> list[Path]:
        """Leftovers of checkpoint writes that were interrupted (never loaded)."""
        if not self.dir.is_dir():
            return []
        return [p for p in self.dir.iterdir() if p.name.startswith(".round-") and p.name.endswith(".tmp")]

    def verify(self, path: Path) -> str | None:
        """Why the checkpoint at `path` cannot be loaded, or None if it is complete."""
        mpath = path / "manifest.json"
        if not mpath.is_file():
            return "no manifest (the write was interrupted)"
        try:
            manifest = json.loads(mpath.read_text())
            files, rnd = manifest["files"], int(manifest["round"])
        except (ValueError, KeyError, TypeError, OSError):
            return "unreadable manifest"
        if manifest.get("format") != FORMAT:
            return f"checkpoint format {manifest.get('format')!r}, this version reads {FORMAT}"
        if f"round-{rnd:06d}" != path.name:
            return f"manifest says round {rnd}"
        for fname in ("state.pt", "metrics.jsonl", "config.yaml"):
            info = files.get(fname)
            p = path / fname
            if not isinstance(info, dict) or not p.is_file():
                return f"{fname} is missing"
            if p.stat().st_size != info.get("bytes") or file_sha256(p) != info.get("sha256"):
                return f"{fname} does not match the manifest"
        return None

    def latest(self) -> tuple[Checkpoint | None, dict[str, str]]:
        """The newest complete checkpoint (or None), and {name: why} of newer ones that were skipped."""
        skipped: dict[str, str] = {}
        for path in self._committed():
            why = self.verify(path)
            if why is None:
                try:
                    return self._load(path), skipped
                except Exception as e:  # noqa: BLE001 - a file that passed its hash but cannot be read
                    why = f"cannot be read ({type(e).__name__})"
            skipped[path.name] = why
        return None, skipped

    @staticmethod
    def _load(path: Path) -> Checkpoint:
        manifest = json.loads((path / "manifest.json").read_text())
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        metrics = (path / "metrics.jsonl").read_text().splitlines(keepends=True)
        return Checkpoint(round=int(manifest["round"]), state=state, metrics=metrics,
                          config_yaml=(path / "config.yaml").read_text(), fingerprint=str(manifest["fingerprint"]),
                          elapsed=float(manifest.get("elapsed", 0.0)), path=path)


def is_due(rnd: int, rounds: int, every: int) -> bool:
    """Checkpoint after this round? Every `every` rounds and always after the last (`every` 0: last only)."""
    return rnd == rounds or (every > 0 and rnd % every == 0)


# ----------------------------------------------------------------------------- resuming a run directory


def open_for_resume(run: Path, label: str) -> tuple[Checkpoint | None, dict[str, str], bool]:
    """(newest complete checkpoint or None, {skipped checkpoint: why}, finished) of a run directory.

    Raises CheckpointError (one line) when `run` is not a run directory, or has neither a complete
    checkpoint nor a finished result. `label` names the option in messages (`--resume`, `run config resume`).
    """
    run = Path(run)
    if not run.exists():
        raise CheckpointError(f"{label}: {run} does not exist")
    if not run.is_dir():
        raise CheckpointError(f"{label}: {run} is not a directory")
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{label}: {run} is not a run directory (it has no config.yaml)")
    ckpt, skipped = CheckpointStore(run).latest()
    finished = (run / "results.json").is_file()
    if ckpt is None and not finished:
        detail = ""
        if skipped:
            name, why = next(iter(skipped.items()))
            detail = f"; {name}: {why}" + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else "")
        raise CheckpointError(f"{label}: {run} has no complete checkpoint to resume from{detail}")
    return ckpt, skipped, finished


def check_resume(run: Path, ckpt: Checkpoint | None, finished: bool, cfg, *, force: bool, label: str,
                 force_hint: str) -> bool:
    """Refuse (CheckpointError) a resume whose config differs from the checkpoint's, unless `force`.

    Returns True when there is nothing to do (the run finished all of cfg's rounds).
    """
    import yaml

    from .config import config_from_dict, load_config

    if ckpt is not None:
        try:
            saved = config_from_dict(yaml.safe_load(ckpt.config_yaml))
        except UserError as e:
            raise CheckpointError(f"{label}: the config in {ckpt.path} is invalid: {e}") from None
    else:
        saved = load_config(Path(run) / "config.yaml")
    diff = config_difference(saved.to_dict(), cfg.to_dict())
    if diff and not force:
        raise CheckpointError(f"{label}: the config differs from the run's ({diff}); {force_hint}")
    if finished and (ckpt is None or ckpt.round >= cfg.federation.rounds):
        return True
    if ckpt is None:
        raise CheckpointError(f"{label}: {run} has no complete checkpoint to resume from")
    if ckpt.round > cfg.federation.rounds:
        raise CheckpointError(f"{label}: the checkpoint is after round {ckpt.round}, beyond "
                              f"federation.rounds={cfg.federation.rounds}")
    return False


def config_difference(old: dict, new: dict, prefix: str = "") -> str:
    """The first differing field (and how many more) between two config dicts; '' when equal.

    The `output` section is not compared: it says what is written, not what is computed.
    """
    diffs = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(a) + [k for k in b if k not in a]:
                if path == "" and k == "output":
                    continue
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")

    walk(old, new, prefix)
    if not diffs:
        return ""
    return diffs[0] + (f" and {len(diffs) - 1} more" if len(diffs) > 1 else "")
