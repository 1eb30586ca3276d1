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

from collections.abc import Mapping
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord

if TYPE_CHECKING:
    import torch

SETUP = "query.setup"
ROUND = "train.round"

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
    out = {k: metrics[k] for k in ("local-loss", "local-steps") if k in metrics}
    for which, prefix in _EVALS.items():
        if prefix + "loss" in metrics:
            rouge = metrics.get(prefix + "rouge-l")
            out[which] = {"loss": float(metrics[prefix + "loss"]), "rouge_l": None if rouge is None else float(rouge),
                          "examples": int(metrics[prefix + "examples"]), "tokens": int(metrics[prefix + "tokens"])}
    return out
