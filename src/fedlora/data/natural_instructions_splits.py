"""Super-NaturalInstructions v2 (SNI): which tasks go where — official split lists, the unseen tasks that no
client trains on, and task-level partitions over clients (one task each, or groups sharing a category).

The task files themselves are read by `natural_instructions` (which re-exports these names).
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from fedlora.errors import DataError


# ---------------------------------------------------------------------------------------------
# official splits and unseen tasks


def read_split(path: str | Path, name: str = "test") -> list[str]:
    """Task names of an official split list, in file order.

    `path` is a split file (then `name` is ignored) or a folder holding `{name}_tasks.txt` or
    `{name}.txt`, directly or under `default/` (so both `splits/` and `splits/default/` work).
    Blank lines and lines starting with '#' are ignored.
    """
    p = Path(path).expanduser()
    if p.is_file():
        file = p
    elif p.is_dir():
        candidates = [
            d / f for d in (p, p / "default") for f in (f"{name}_tasks.txt", f"{name}.txt")
        ]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(f"no split list '{name}' ({name}_tasks.txt) in {p}")
        file = found[0]
    else:
        raise DataError(f"split list not found: {p}")
    lines = file.read_text(encoding="utf-8").splitlines()
    return [s.strip().removesuffix(".json") for s in lines if s.strip() and not s.strip().startswith("#")]


def unseen_tasks(
    available: list[str],
    train_tasks: list[str],
    *,
    split_test: list[str] | None,
    n_holdout: int,
    seed: int,
) -> list[str]:
    """Tasks that no client trains on, for the unseen-task evaluation (sorted).

    Rule: candidates are the available tasks not in `train_tasks`. If the official test split
    (`split_test`) meets the candidates, the answer is that whole intersection (`n_holdout` is
    then ignored). Otherwise it is a seeded random choice of `n_holdout` candidates; `n_holdout=0`
    gives []. Raises `DataError` when there are fewer candidates than `n_holdout`.
    """
    training = set(train_tasks)
    candidates = sorted(t for t in set(available) if t not in training)
    if split_test:
        official = set(split_test)
        chosen = [t for t in candidates if t in official]
        if chosen:
            return chosen
    if n_holdout < 0:
        raise DataError(f"n_holdout must be 0 or more (got {n_holdout})")
    if len(candidates) < n_holdout:
        raise DataError(
            f"only {len(candidates)} task(s) are not trained on, cannot hold out {n_holdout} unseen tasks"
        )
    return sorted(random.Random(seed).sample(candidates, n_holdout))


# ---------------------------------------------------------------------------------------------
# task-level partitions


def one_task_per_client(tasks: list[str], num_clients: int, seed: int) -> list[str]:
    """A seeded choice of `num_clients` distinct tasks; client i gets the i-th."""
    distinct = sorted(set(tasks))
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1 (got {num_clients})")
    if len(distinct) < num_clients:
        raise DataError(
            f"one task per client needs {num_clients} distinct tasks, only {len(distinct)} available"
        )
    return random.Random(seed).sample(distinct, num_clients)


def group_tasks_by_category(
    categories: dict[str, str], tasks_per_client: int, num_clients: int, seed: int
) -> list[list[str]]:
    """Give each of `num_clients` clients `tasks_per_client` distinct tasks, a client's tasks
    sharing one category where possible.

    Within each category the tasks are shuffled (seeded) and cut into full groups. Clients take
    these single-category groups round-robin over the categories (in a seeded order), so the
    clients spread over categories rather than all coming from the largest one. When the
    single-category groups run out, the left-over tasks, ordered by category, are cut into
    mixed groups. Raises `DataError` when there are fewer than num_clients * tasks_per_client tasks.
    """
    if num_clients < 1 or tasks_per_client < 1:
        raise DataError(
            f"num_clients and tasks_per_client must be at least 1 (got {num_clients}, {tasks_per_client})"
        )
    needed = num_clients * tasks_per_client
    if len(categories) < needed:
        raise DataError(
            f"{num_clients} clients x {tasks_per_client} tasks need {needed} distinct tasks, "
            f"only {len(categories)} available"
        )
    rng = random.Random(seed)
    by_cat: dict[str, list[str]] = defaultdict(list)
    for task in sorted(categories):
        by_cat[categories[task]].append(task)
    order = sorted(by_cat)
    rng.shuffle(order)

    full: dict[str, list[list[str]]] = {}
    leftover: list[str] = []
    for cat in order:
        members = by_cat[cat]
        rng.shuffle(members)
        n_full = len(members) // tasks_per_client
        full[cat] = [members[i * tasks_per_client : (i + 1) * tasks_per_client] for i in range(n_full)]
        leftover.extend(members[n_full * tasks_per_client :])

    clients: list[list[str]] = []
    while len(clients) < num_clients and any(full.values()):
        for cat in order:
            if full[cat] and len(clients) < num_clients:
                clients.append(full[cat].pop(0))
    i = 0
    while len(clients) < num_clients:  # enough tasks are guaranteed by the check above
        clients.append(leftover[i : i + tasks_per_client])
        i += tasks_per_client
    return clients
