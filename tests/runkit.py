"""Helpers for tests that run the real CLI: a saved tiny model, a small data file, directory snapshots."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from conftest import DOLLY
from tiny import tiny_model, tiny_tokenizer


def save_tiny_model(path: Path) -> Path:
    """tests/tiny.py's model and tokenizer, saved with save_pretrained so `model.name` can point at them."""
    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_data(path: Path, n: int = 240, seed: int = 0) -> Path:
    """n Dolly rows drawn across the whole file (so every category is present), as JSONL."""
    rows = DOLLY.read_text().splitlines(keepends=True)
    random.Random(seed).shuffle(rows)
    path.write_text("".join(rows[:n]))
    return path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and directory under root with its size, mtime and content hash: any change shows."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, digest)
    return out


def metrics_without_wall_time(path: Path) -> list[dict]:
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k != "wall_time"}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    return [strip(json.loads(line)) for line in path.read_text().splitlines()]
