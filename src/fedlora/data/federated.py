"""Build the federated dataset: load, hold out global test sets, partition, split each client train/test."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .examples import Example
from .partition import partition
from .sources import fingerprint, read_records, to_examples


@dataclass
class ClientData:
    train: list[Example]
    test: list[Example]
    validation: list[Example] = field(default_factory=list)


@dataclass
class FederatedData:
    clients: list[ClientData]
    global_test: dict[str, list[Example]]
    """Held-out examples per label (category / task), never trained on by anyone."""
    unseen_test: dict[str, list[Example]] = field(default_factory=dict)
    """Examples of labels (tasks) that no client trains on (Natural Instructions)."""
    fingerprint: str = ""
    labels: list[str] = field(default_factory=list)

    def table(self) -> tuple[list[str], list[list[int]]]:
        """Client x label counts of training rows."""
        rows = []
        for c in self.clients:
            counts = Counter(e.label for e in c.train)
            rows.append([counts.get(lab, 0) for lab in self.labels])
        return self.labels, rows


def load_examples(cfg, warn: Callable[[str], None] = print) -> tuple[list[Example], dict[str, list[Example]]]:
    """All examples of the configured source, and (NI only) examples of unseen tasks."""
    d = cfg.data
    if d.source == "natural_instructions":
        from .natural_instructions_source import load_ni_for_config

        return load_ni_for_config(cfg, warn)
    rows = read_records(d.path, warn=warn)
    return to_examples(rows, d.field_map, source=d.path, warn=warn), {}


def split_client(examples: list[Example], test_fraction: float, min_test: int, validation_fraction: float,
                 rng: np.random.Generator) -> ClientData:
    idx = rng.permutation(len(examples))
    n_test = max(min_test, int(round(test_fraction * len(examples))))
    if len(examples) - n_test < 1:
        raise DataError(f"a client has {len(examples)} examples: too few for a test split of {n_test} "
                        f"plus training data; use fewer clients or more rows")
    test = [examples[i] for i in idx[:n_test]]
    rest = [examples[i] for i in idx[n_test:]]
    n_val = int(round(validation_fraction * len(rest)))
    if validation_fraction > 0 and len(rest) - n_val < 1:
        raise DataError("data.validation_fraction leaves a client with no training rows")
    return ClientData(train=rest[n_val:], test=test, validation=rest[:n_val])


def build_federated_data(cfg, examples: list[Example], unseen: dict[str, list[Example]] | None = None) -> FederatedData:
    d, n = cfg.data, cfg.federation.clients
    rng = np.random.default_rng(cfg.seed)
    fp = fingerprint(examples)
    if d.max_rows is not None and d.max_rows < len(examples):
        keep = sorted(rng.choice(len(examples), size=d.max_rows, replace=False).tolist())
        examples = [examples[i] for i in keep]
    labels = sorted({e.label for e in examples})
    # global test set: per label, held out before partitioning
    by_label: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    global_test: dict[str, list[Example]] = {}
    held: set[int] = set()
    for lab in labels:
        idx = rng.permutation(by_label[lab])
        k = min(d.global_test_per_label, len(idx) // 5)
        global_test[lab] = [examples[i] for i in idx[:k]]
        held.update(idx[:k].tolist())
    pool = [e for i, e in enumerate(examples) if i not in held]
    min_size = d.min_test_per_client + 1
    assignment = None
    if d.source == "natural_instructions":  # several tasks per client: grouped by category
        from .natural_instructions_source import client_task_groups

        assignment = client_task_groups(cfg, labels)
    parts = partition(d.partition, [e.label for e in pool], n, cfg.seed, alpha=d.alpha,
                      shards_per_client=d.shards_per_client, labels_per_client=d.labels_per_client,
                      min_size=min_size, assignment=assignment)
    clients = []
    for c, part in enumerate(parts):
        crng = np.random.default_rng([cfg.seed, c])
        cd = split_client([pool[i] for i in part], d.test_fraction, d.min_test_per_client,
                          d.validation_fraction, crng)
        if d.max_train_per_client is not None:
            cd.train = cd.train[: d.max_train_per_client]
        clients.append(cd)
    return FederatedData(clients=clients, global_test={k: v for k, v in global_test.items() if v},
                         unseen_test=unseen or {}, fingerprint=fp, labels=labels)


def own_client_data(cfg, examples: list[Example]) -> ClientData:
    """A client that holds its own data (a Flower node started with its own data-path): it carves its own
    seeded test (and validation) split and trains on the rest, with the same data settings as a partition.

    The split depends only on the rows and `cfg.seed`, not on the client id the server assigns, so a node
    that restarts (or is given another id) holds the same split.
    """
    d = cfg.data
    rng = np.random.default_rng([cfg.seed, 0x0D47A])
    if d.max_rows is not None and d.max_rows < len(examples):
        examples = [examples[i] for i in sorted(rng.choice(len(examples), size=d.max_rows, replace=False).tolist())]
    cd = split_client(examples, d.test_fraction, d.min_test_per_client, d.validation_fraction, rng)
    if d.max_train_per_client is not None:
        cd.train = cd.train[: d.max_train_per_client]
    return cd
