"""Natural Instructions as a run's data source: which tasks the clients train on, which are unseen.

`load_ni_for_config(cfg, warn)` is what `load_examples` calls for `data.source: natural_instructions`.

- `data.path` is an SNI checkout root (holding `tasks/` and `splits/`), a folder of task files of
  the user's choosing, or a hub id (`Muennighoff/natural-instructions`). The built-in Dolly default
  path is read as the shared NI folder, so `--set data.source=natural_instructions` alone works.
- Training tasks: `data.tasks` when given; otherwise a seeded, diverse choice of
  `federation.clients * data.labels_per_client` tasks (one task per client by default), spread
  over categories, or grouped by category when a client holds several tasks. Tasks of the official
  test split are never chosen, so they stay available as unseen tasks.
- Unseen tasks: the tasks of the official `splits/default/test_tasks.txt` that are present and not
  trained on; where none are present, a seeded choice of `data.unseen_tasks` tasks that no client
  trains on. Their examples go to `FederatedData.unseen_test` and are never partitioned.
- Each task keeps at most `data.max_instances_per_task` instances (a seeded subset).

The client partition itself is done by `build_federated_data` over the task label: `task`
(default: each client gets its tasks; with several tasks per client, the category groups from
`client_task_groups`), or `dirichlet` / `iid` over the chosen tasks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from ..config import DEFAULT_DOLLY_PATH
from ..errors import DataError
from .examples import Example
from .natural_instructions import load_ni_from_hub, load_ni_task_categories, load_ni_tasks
from .natural_instructions_splits import group_tasks_by_category, read_split, unseen_tasks

Warn = Callable[[str], None]

DEFAULT_NI_PATH = "../shared/data/natural-instructions"
NI_HUB_ID = "Muennighoff/natural-instructions"


# ---------------------------------------------------------------------------------------------
# where the data is


def ni_path(cfg) -> str:
    """`data.path`, with the built-in Dolly default read as the shared NI folder."""
    path = cfg.data.path
    return DEFAULT_NI_PATH if path in ("", DEFAULT_DOLLY_PATH) else path


def is_hub_id(path: str) -> bool:
    """`owner/name` that is not a local path."""
    return not Path(path).expanduser().exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def official_test_split(path: str | Path) -> list[str] | None:
    """The official test task names, from `splits/` next to (or inside) the task folder; None if absent."""
    folder = Path(path).expanduser()
    for root in (folder, folder.parent):
        if (root / "splits").is_dir():
            try:
                return read_split(root / "splits", "test")
            except DataError:
                return None
    return None


def _check_tasks(requested: list[str], available: dict, where: str) -> list[str]:
    names = list(dict.fromkeys(t.removesuffix(".json") for t in requested))
    unknown = [t for t in names if t not in available]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise DataError(f"data.tasks: unknown or unusable Natural Instructions task(s): {shown} "
                        f"({len(available)} usable tasks in {where})")
    return names


# ---------------------------------------------------------------------------------------------
# choosing the training tasks


def needed_tasks(cfg) -> int:
    return cfg.federation.clients * cfg.data.labels_per_client


def choose_train_tasks(categories: dict[str, str], cfg, reserved: set[str]) -> list[str]:
    """A seeded diverse choice of clients x labels_per_client tasks, none of them in `reserved`.

    With one task per client the tasks are spread round-robin over the categories; with several,
    each client's group shares a category where possible (see `group_tasks_by_category`).
    Returned in client order (client 0's tasks first).
    """
    candidates = {t: c for t, c in categories.items() if t not in reserved}
    n, k = cfg.federation.clients, cfg.data.labels_per_client
    if len(candidates) < n * k:
        raise DataError(
            f"{n} clients x {k} task(s) per client need {n * k} training tasks, but only {len(candidates)} "
            f"usable tasks are left after holding out {len(reserved)} unseen task(s); use fewer clients, "
            f"fewer data.labels_per_client, or list data.tasks"
        )
    groups = group_tasks_by_category(candidates, k, n, cfg.seed)
    return [t for g in groups for t in g]


def client_task_groups(cfg, tasks: list[str]) -> list[list[str]] | None:
    """Which tasks each client holds under the `task` partition, or None for the partitioner's own rule.

    Only needed when a client holds several tasks (`data.labels_per_client > 1`) and there are
    exactly clients x labels_per_client tasks: then the tasks are grouped by category (read from
    the task files), the same grouping `choose_train_tasks` chose them by. The hub copy has no
    categories, so it gets None.
    """
    d = cfg.data
    if d.source != "natural_instructions" or d.partition != "task" or d.labels_per_client < 2:
        return None
    if len(tasks) != needed_tasks(cfg):
        return None
    path = ni_path(cfg)
    if is_hub_id(path):
        return None
    categories = load_ni_task_categories(path, tasks=list(tasks), warn=lambda _m: None)
    if len(categories) != len(tasks):
        return None
    return group_tasks_by_category(categories, d.labels_per_client, cfg.federation.clients, cfg.seed)


# ---------------------------------------------------------------------------------------------
# the entry point


def load_ni_for_config(cfg, warn: Warn = print) -> tuple[list[Example], dict[str, list[Example]]]:
    """(examples of the training tasks, {unseen task: examples}) for this run's config."""
    path = ni_path(cfg)
    if is_hub_id(path):
        return _from_hub(cfg, path, warn)
    return _from_folder(cfg, path, warn)


def _check_partition(cfg, train: list[str]) -> None:
    """Under the `task` partition every chosen task must belong to some client."""
    d = cfg.data
    if d.partition in ("task", "label") and len(train) > needed_tasks(cfg):
        raise DataError(
            f"data.tasks lists {len(train)} tasks but {cfg.federation.clients} clients x "
            f"{d.labels_per_client} task(s) per client hold only {needed_tasks(cfg)}; list fewer tasks, "
            f"or raise federation.clients or data.labels_per_client"
        )


def _from_folder(cfg, path: str, warn: Warn) -> tuple[list[Example], dict[str, list[Example]]]:
    d = cfg.data
    tasks = load_ni_tasks(path, max_instances_per_task=d.max_instances_per_task,
                          num_positive_examples=d.num_positive_examples, seed=cfg.seed, warn=warn)
    categories = load_ni_task_categories(path, tasks=list(tasks), warn=lambda _m: None)
    split_test = official_test_split(path)
    reserved = set(split_test or ()) & set(tasks)

    if d.tasks:
        train = _check_tasks(d.tasks, tasks, path)
    else:
        train = choose_train_tasks(categories, cfg, reserved)
    _check_partition(cfg, train)
    unseen = unseen_tasks(list(tasks), train, split_test=split_test, n_holdout=d.unseen_tasks, seed=cfg.seed)

    examples = [e for t in train for e in tasks[t]]
    return examples, {t: _shuffled(tasks[t], cfg.seed, t) for t in unseen}


def _from_hub(cfg, dataset_id: str, warn: Warn) -> tuple[list[Example], dict[str, list[Example]]]:
    """The hub copy: training tasks from its train split, unseen tasks from its test split
    (which holds the official test tasks). It has no categories, so the choice is plainly seeded."""
    d = cfg.data
    cap = d.max_instances_per_task
    if d.num_positive_examples:
        warn("data.num_positive_examples is ignored for the hub copy (it has no positive examples)")
    train_tasks = load_ni_from_hub(dataset_id, "train", tasks=d.tasks, max_instances_per_task=cap,
                                   seed=cfg.seed, warn=warn)
    if d.tasks:
        train = _check_tasks(d.tasks, train_tasks, dataset_id)
    else:
        train = choose_train_tasks({t: "unknown" for t in train_tasks}, cfg, set())
    _check_partition(cfg, train)
    unseen: dict[str, list[Example]] = {}
    if d.unseen_tasks > 0:
        test_tasks = load_ni_from_hub(dataset_id, "test", max_instances_per_task=cap, seed=cfg.seed, warn=warn)
        names = unseen_tasks(list(test_tasks), train, split_test=None, n_holdout=min(d.unseen_tasks, len(test_tasks)),
                             seed=cfg.seed)
        unseen = {t: _shuffled(test_tasks[t], cfg.seed, t) for t in names}
    return [e for t in train for e in train_tasks[t]], unseen


def _shuffled(examples: list[Example], seed: int, task: str) -> list[Example]:
    """A seeded shuffle, so that evaluating the first k examples of an unseen task is a random sample."""
    out = list(examples)
    random.Random(f"{seed}:unseen:{task}").shuffle(out)
    return out
