"""The messages between the ServerApp and the ClientApps: types, record names, tensor transport.

  query.setup   server -> node: config (+ the server's data fingerprint)
                node -> server: partition-id, row counts, data fingerprint
  train.global  server -> node: config, round, `shared` (the global shared components)
                node -> server: `update` (the trained shared components ONLY), `metrics`
  train.local   server -> node: config, round, `shared` (the new global shared components), flags
                `local` (run the local phase), `evaluate` (evaluate the local model) and `base` (evaluate
                the base model with no adapter: round 0, the reference row; no `shared`)
                node -> server: `metrics` (losses, local evaluation) and nothing else

Personal components are kept in the node's `Context.state` (`personal.ContextPersonalStore`) and appear in no message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord

if TYPE_CHECKING:
    import torch

SETUP = "query.setup"
GLOBAL = "train.global"
LOCAL = "train.local"

CONFIG = "fedlora"  # ConfigRecord: config (YAML text), round, flags
SHARED = "shared"  # ArrayRecord: server -> client
UPDATE = "update"  # ArrayRecord: client -> server
METRICS = "metrics"  # MetricRecord: client -> server
INFO = "info"  # ConfigRecord: setup reply


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors -> ArrayRecord. numpy has no bfloat16: it travels as its bits in int16 (2 bytes, exact)."""
    import torch

    if not state:
        return ArrayRecord()
    return ArrayRecord({k: (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).detach().cpu().contiguous()
                        for k, v in state.items()})


def from_record(record: ArrayRecord, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors on the device of `like`; bfloat16 where `like` is bfloat16 (sent as int16 bits)."""
    import torch

    out = {}
    for k, v in record.to_torch_state_dict().items():
        ref = like.get(k)
        if ref is not None:
            if ref.dtype == torch.bfloat16 and v.dtype == torch.int16:
                v = v.view(torch.bfloat16)
            elif ref.dtype == torch.bfloat16 and v.dtype == torch.float32:
                v = v.to(torch.bfloat16)
            v = v.to(device=ref.device)
        out[k] = v
    return out


_EVAL_FIELDS = {"loss": "eval-loss", "rouge_l": "eval-rouge-l", "examples": "eval-examples", "tokens": "eval-tokens"}


def local_metrics(answer: Mapping) -> dict:
    """A `ClientHost.local_round` answer -> the flat metrics of a train.local reply."""
    out = {k: v for k, v in answer.items() if k != "eval"}
    for key, name in _EVAL_FIELDS.items():
        value = answer.get("eval", {}).get(key)
        if value is not None:
            out[name] = value
    return out


def local_answer(metrics: Mapping) -> dict:
    """The flat metrics of a train.local reply -> the `ClientHost.local_round` answer they came from."""
    out = {k: metrics[k] for k in ("local-loss", "local-steps") if k in metrics}
    if "eval-loss" in metrics:
        out["eval"] = {"loss": float(metrics["eval-loss"]), "rouge_l": metrics.get("eval-rouge-l"),
                       "examples": int(metrics["eval-examples"]), "tokens": int(metrics["eval-tokens"])}
        if out["eval"]["rouge_l"] is not None:
            out["eval"]["rouge_l"] = float(out["eval"]["rouge_l"])
    return out
