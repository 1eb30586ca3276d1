"""Seeded partitioners: which client owns which example.

All take the examples' labels and return one list of example indices per client; every index
appears in exactly one client (examples no client gets are reported, never duplicated).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..errors import DataError


def _by_label(labels: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        groups[lab].append(i)
    return dict(sorted(groups.items()))


def iid(labels: list[str], num_clients: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    return [sorted(part.tolist()) for part in np.array_split(perm, num_clients)]


def dirichlet(labels: list[str], num_clients: int, alpha: float, seed: int, min_size: int = 1,
              max_tries: int = 100) -> list[list[int]]:
    """Per label, split its examples across clients in proportions drawn from Dir(alpha).

    Redraws (up to max_tries) until every client has at least `min_size` examples.
    """
    rng = np.random.default_rng(seed)
    groups = _by_label(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in groups.values():
            idx = rng.permutation(idx)
            props = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise DataError(
        f"Dirichlet partition (alpha={alpha}) left a client with fewer than {min_size} examples after "
        f"{max_tries} draws: use fewer clients, more rows, or a larger data.alpha"
    )


def by_label(labels: list[str], num_clients: int, seed: int, labels_per_client: int = 1,
             assignment: list[list[str]] | None = None) -> list[list[int]]:
    """Each client holds `labels_per_client` labels; a label shared by several clients is split evenly.

    `assignment`, when given, names the labels of each client (one list per client) instead."""
    rng = np.random.default_rng(seed)
    groups = _by_label(labels)
    names = list(groups)
    if labels_per_client > len(names):
        raise DataError(f"data.labels_per_client={labels_per_client} but the data has only {len(names)} labels")
    order = [names[i] for i in rng.permutation(len(names))]
    if assignment is None:
        assignment = [[order[(c * labels_per_client + j) % len(order)] for j in range(labels_per_client)]
                      for c in range(num_clients)]
    elif len(assignment) != num_clients or any(lab not in groups for labs in assignment for lab in labs):
        raise DataError(f"label assignment {assignment} does not fit {num_clients} clients and labels {names}")
    owners: dict[str, list[int]] = defaultdict(list)
    for c, labs in enumerate(assignment):
        for lab in labs:
            owners[lab].append(c)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for lab, clients in owners.items():
        idx = rng.permutation(groups[lab])
        for c, chunk in zip(clients, np.array_split(idx, len(clients))):
            parts[c].extend(chunk.tolist())
    return [sorted(p) for p in parts]


def shards(labels: list[str], num_clients: int, seed: int, shards_per_client: int = 2) -> list[list[int]]:
    """Pathological non-IID (McMahan et al.): sort by label, cut into shards, deal shards to clients."""
    rng = np.random.default_rng(seed)
    order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
    n_shards = num_clients * shards_per_client
    if n_shards > len(labels):
        raise DataError(f"{n_shards} shards requested ({num_clients} clients x {shards_per_client}) "
                        f"but only {len(labels)} examples")
    pieces = np.array_split(np.array(order), n_shards)
    deal = rng.permutation(n_shards)
    return [sorted(np.concatenate([pieces[s] for s in deal[c::num_clients]]).tolist()) for c in range(num_clients)]


def partition(kind: str, labels: list[str], num_clients: int, seed: int, *, alpha: float = 0.5,
              shards_per_client: int = 2, labels_per_client: int = 1, min_size: int = 1,
              assignment: list[list[str]] | None = None) -> list[list[int]]:
    if num_clients > len(labels):
        raise DataError(f"federation.clients={num_clients} but only {len(labels)} training rows are left after "
                        f"the global test set, so some clients would get none: lower federation.clients to at "
                        f"most {len(labels)}, or use more rows (data.max_rows, a bigger data file)")
    if kind == "iid":
        parts = iid(labels, num_clients, seed)
    elif kind == "dirichlet":
        parts = dirichlet(labels, num_clients, alpha, seed, min_size=min_size)
    elif kind in ("label", "task"):
        parts = by_label(labels, num_clients, seed, labels_per_client, assignment)
    elif kind == "shards":
        parts = shards(labels, num_clients, seed, shards_per_client)
    else:
        raise DataError(f"data.partition: unknown partitioner {kind!r}")
    for c, p in enumerate(parts):
        if len(p) < min_size:
            raise DataError(f"client {c} got {len(p)} examples (needs at least {min_size}): "
                            f"use fewer clients or more data")
    return parts
