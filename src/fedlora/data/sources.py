"""Data sources: Dolly-15k and any JSON/JSONL file with a field map, from a local path or a hub id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import DataError
from .examples import Example


def _looks_like_hub_id(path: str) -> bool:
    return not Path(path).exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def read_records(path: str, *, warn: Callable[[str], None] = print, skip_bad: bool = True) -> list[dict]:
    """Rows of a local JSONL file, a JSON file holding a list, or a hub dataset (train split)."""
    p = Path(path).expanduser()
    if _looks_like_hub_id(path):
        return _read_hub(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if p.is_dir():
        raise DataError(f"data path is a directory, expected a JSON or JSONL file: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {p}: {e}") from None
    if not text.strip():
        raise DataError(f"data file is empty: {p}")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"data file {p} is not valid JSON (line {e.lineno}): {e.msg}") from None
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"data file {p}: expected a list of JSON objects")
        return rows
    rows, bad = [], 0
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if not skip_bad:
                raise DataError(f"data file {p}, line {i}: invalid JSON ({e.msg})") from None
            bad += 1
            continue
        if not isinstance(row, dict):
            if not skip_bad:
                raise DataError(f"data file {p}, line {i}: expected a JSON object")
            bad += 1
            continue
        rows.append(row)
    if bad:
        warn(f"warning: skipped {bad} invalid line(s) in {p}")
    return rows


def _read_hub(dataset_id: str) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # noqa: BLE001 - offline or no such dataset
        raise DataError(f"cannot load dataset {dataset_id!r} from the hub (offline, or no such id): "
                        f"{type(e).__name__}") from None
    return [dict(r) for r in ds]


def to_examples(rows: list[dict], field_map: Mapping[str, str], *, source: str,
                warn: Callable[[str], None] = print) -> list[Example]:
    """Map raw rows to Examples; rows missing a required field or with non-string values are skipped and counted."""
    f_ins, f_resp = field_map["instruction"], field_map["response"]
    f_ctx, f_label = field_map.get("context"), field_map.get("label")
    out, bad, reason = [], 0, ""
    for i, row in enumerate(rows):
        values = {}
        for key, f in (("instruction", f_ins), ("response", f_resp), ("context", f_ctx), ("label", f_label)):
            if f is None:
                values[key] = ""
                continue
            v = row.get(f)
            if key in ("context",) and v is None:
                v = ""
            if key == "label" and isinstance(v, (int, float)) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, str):
                reason = reason or f"row {i}: field '{f}' is {'missing' if f not in row else type(v).__name__}"
                values = None
                break
            values[key] = v
        if values is None or not values["instruction"].strip() or not values["response"].strip():
            bad += 1
            reason = reason or f"row {i}: empty instruction or response"
            continue
        out.append(Example(values["instruction"], values["context"], values["response"],
                           values["label"] or "all", uid=f"{i}"))
    if bad:
        warn(f"warning: skipped {bad} of {len(rows)} row(s) in {source} (first: {reason})")
    if not out:
        raise DataError(f"no usable rows in {source}: {reason or 'the file has no rows'} "
                        f"(field map: {dict(field_map)})")
    return out


def fingerprint(examples: list[Example]) -> str:
    """A short content hash of the examples, recorded with results."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.instruction, e.context, e.response, e.label], ensure_ascii=False).encode())
    return h.hexdigest()[:16]
