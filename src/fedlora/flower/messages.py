"""The messages between the ServerApp and the ClientApps: types, record names, tensor transport.

  query.setup   server -> node: config, run id, client-data mode (+ the server's data fingerprint)
                node -> server: its client (partition-id, or its own name), row counts
  train.round   server -> node: config, run id, client id, `shared` (the server's shared state S), and
                - the open round's tasks for this client (`task-round`; flags `local`: run the local
                  phase, `evaluate`: evaluate the local model, `evaluate-global`: evaluate the global model S
                  on its own rows, `base`: evaluate the base model instead, round 0), done first, on S;
                - `train`: then run round `train-round`'s global phase from S.
                node -> server: `update` (the trained shared components ONLY, if it trained) and `metrics`

One message per client per round (the last round is finished by one closing message with no global phase).
Personal components stay in the node's state directory (`personal.DiskPersonalStore`) and appear in no message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord

from ..errors import UpdateRejected

if TYPE_CHECKING:
    import torch

SETUP = "query.setup"
ROUND = "train.round"

CONFIG = "fedlora"  # ConfigRecord: config (YAML text), round, flags
SHARED = "shared"  # ArrayRecord: server -> client
UPDATE = "update"  # ArrayRecord: client -> server
METRICS = "metrics"  # MetricRecord: client -> server
INFO = "info"  # ConfigRecord: setup reply


PACKED = "PACKED"  # in an ArrayRecord: every tensor of a state, back to back, as ONE uint8 array
LAYOUT = "LAYOUT"  # beside it: JSON {"tensors": [[name, dtype, shape, offset, nbytes], ...]} as uint8 bytes
_DTYPES = ("float32", "bfloat16", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors -> an ArrayRecord of two arrays: PACKED (all tensors' bytes, exact dtypes incl. bfloat16) and
    LAYOUT. Flower sends each Array as its own object(s); one array per message instead of one per tensor cuts
    SmolLM2's ~700-960 transfers per message to a handful."""
    import numpy as np
    import torch

    if not state:
        return ArrayRecord()
    parts, entries, offset = [], [], 0
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {dtype} cannot travel (one of {', '.join(_DTYPES)})")
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        entries.append([name, dtype, list(t.shape), offset, raw.numel()])
        parts.append(raw)
        offset += raw.numel()
    layout = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
    return ArrayRecord({PACKED: Array(torch.cat(parts).numpy()),
                        LAYOUT: Array(np.frombuffer(layout, dtype=np.uint8))}, keep_input=True)


def names(record: ArrayRecord) -> list[str]:
    """The tensor names a record carries, in order, without unpacking their values (audits, tests)."""
    return [e[0] for e in _layout(record)[0]]


def from_record(record: ArrayRecord, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `to_record` record -> the same tensors, bit for bit, on the device of `like` (float32 where `like` is
    bfloat16: cast to bfloat16). A malformed record (from the wire) raises UpdateRejected, one line."""
    import torch

    entries, packed = _layout(record)
    out = {}
    for name, dtype, shape, offset, size in entries:
        v = torch.empty(shape, dtype=getattr(torch, dtype))
        v.reshape(-1).view(torch.uint8).numpy()[:] = packed[offset:offset + size]
        ref = like.get(name)
        if ref is not None:
            if ref.dtype == torch.bfloat16 and v.dtype == torch.float32:
                v = v.to(torch.bfloat16)
            v = v.to(device=ref.device)
        out[name] = v
    return out


def _layout(record: ArrayRecord):
    """The checked layout entries and the packed bytes (numpy uint8) of a record; ([], empty) for no tensors."""
    import numpy as np

    if not record:
        return [], np.zeros(0, np.uint8)
    if set(record.keys()) != {PACKED, LAYOUT}:
        raise UpdateRejected(f"malformed tensor record: arrays {sorted(record.keys())!r}, expected "
                             f"{[LAYOUT, PACKED]!r}")
    try:
        packed = record[PACKED].numpy()
        doc = json.loads(record[LAYOUT].numpy().tobytes())
        entries = doc["tensors"]
        if packed.dtype != np.uint8 or packed.ndim != 1 or not isinstance(entries, list):
            raise ValueError(f"packed array {packed.dtype} {packed.shape}")
    except (TypeError, ValueError, KeyError, OSError) as e:
        raise UpdateRejected(f"malformed tensor record: {_one_line(e)}") from None
    end, seen = 0, set()
    for e in entries:
        ok = (isinstance(e, list) and len(e) == 5 and isinstance(e[0], str) and e[0] not in seen
              and e[1] in _DTYPES and isinstance(e[2], list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e[2])
              and e[3] == end and isinstance(e[4], int) and e[4] == _itemsize(e[1]) * math.prod(e[2]))
        if not ok:
            raise UpdateRejected(f"malformed tensor record: bad layout entry {_one_line(e)[:200]}")
        seen.add(e[0])
        end += e[4]
    if end != packed.size:
        raise UpdateRejected(f"malformed tensor record: the layout covers {end} bytes, the packed array has "
                             f"{packed.size}")
    return entries, packed


def _itemsize(dtype: str) -> int:
    return {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "bool": 1, "int8": 1, "uint8": 1}.get(dtype, 2)


def _one_line(x) -> str:
    return " ".join(str(x).split())


_EVAL_FIELDS = {"loss": "loss", "rouge_l": "rouge-l", "examples": "examples", "tokens": "tokens"}
_EVALS = {"eval": "eval-", "global-eval": "global-eval-"}  # answer key -> metric name prefix


def local_metrics(answer: Mapping) -> dict:
    """A `ClientHost.local_round` answer -> the flat metrics of a reply."""
    out = {k: v for k, v in answer.items() if k not in _EVALS}
    for which, prefix in _EVALS.items():
        for key, name in _EVAL_FIELDS.items():
            value = answer.get(which, {}).get(key)
            if value is not None:
                out[prefix + name] = value
    return out


def local_answer(metrics: Mapping) -> dict:
    """The flat metrics of a reply -> the `ClientHost.local_round` answer they came from."""
    out = {k: metrics[k] for k in ("local-loss", "local-steps", "local-tokens") if k in metrics}
    for which, prefix in _EVALS.items():
        if prefix + "loss" in metrics:
            rouge = metrics.get(prefix + "rouge-l")
            out[which] = {"loss": float(metrics[prefix + "loss"]), "rouge_l": None if rouge is None else float(rouge),
                          "examples": int(metrics[prefix + "examples"]), "tokens": int(metrics[prefix + "tokens"])}
    return out
