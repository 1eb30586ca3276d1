"""Super-NaturalInstructions v2 (SNI): task files (or the hub copy's rows) as `Example`s per task.

A task file is one JSON object with (among others) `Definition` (list of strings, or a string),
`Categories` (list of strings, or a plain string in some shortened files), `Positive Examples`
(list of {input, output, explanation}) and `Instances` (list of {id, input, output}).
`output` is normally a list of acceptable answers; some shortened files store it as one plain
string, which is accepted as a single answer.

Every instance becomes one `Example`: instruction = the task definition (plus, optionally,
k positive examples), context = the instance input, response = the first non-empty output,
references = all non-empty outputs, label = the task name (the file stem), uid = the instance id.

Official splits, unseen tasks and task-level partitions live in `natural_instructions_splits`; their
names are re-exported here.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from fedlora.data.examples import Example
from fedlora.data.natural_instructions_splits import (  # noqa: F401  (re-exported)
    group_tasks_by_category,
    one_task_per_client,
    read_split,
    unseen_tasks,
)
from fedlora.errors import DataError

Warn = Callable[[str], None]

UNKNOWN_CATEGORY = "unknown"


# ---------------------------------------------------------------------------------------------
# task folders and files


def _task_dir(path: str | Path) -> Path:
    """The folder holding the task files: `path` itself, or `path/tasks` (an SNI checkout root)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"Natural Instructions folder not found: {folder}")
    if not any(folder.glob("*.json")) and (folder / "tasks").is_dir():
        folder = folder / "tasks"
    return folder


def _task_files(path: str | Path) -> dict[str, Path]:
    folder = _task_dir(path)
    files = {p.stem: p for p in sorted(folder.glob("*.json")) if p.is_file()}
    if not files:
        raise DataError(f"no Natural Instructions task files (*.json) in {folder}")
    return files


def list_ni_tasks(path: str | Path) -> list[str]:
    """Names (file stems) of all task files in `path` (or `path/tasks`), sorted."""
    return sorted(_task_files(path))


def _select(files: dict[str, Path], tasks: list[str] | None, folder: str | Path) -> dict[str, Path]:
    if tasks is None:
        return files
    wanted = [t.removesuffix(".json") for t in tasks]
    unknown = [t for t in wanted if t not in files]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise DataError(
            f"unknown Natural Instructions task(s): {shown} ({len(files)} tasks available in {folder})"
        )
    return {t: files[t] for t in dict.fromkeys(wanted)}


def _read_json(file: Path) -> tuple[Any, str | None]:
    """(data, None) or (None, reason)."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot read file ({type(e).__name__})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON (line {e.lineno}: {e.msg})"


def task_category(task: str | Path | dict) -> str:
    """The category of a task, given its file path or its parsed JSON object.

    `Categories` is a list in the v2 schema and a plain string in some shortened files; both are
    accepted. SNI tasks have exactly one category; if a list holds several, the first is used.
    A missing or empty `Categories` gives "unknown".
    """
    if not isinstance(task, dict):
        data, reason = _read_json(Path(task))
        if reason is not None:
            raise DataError(f"cannot read the category of {task}: {reason}")
        task = data if isinstance(data, dict) else {}
    cats = task.get("Categories")
    if isinstance(cats, str):
        cats = [cats]
    if isinstance(cats, list):
        for c in cats:
            if isinstance(c, str) and c.strip():
                return c.strip()
    return UNKNOWN_CATEGORY


def load_ni_task_categories(
    path: str | Path, *, tasks: list[str] | None = None, warn: Warn = print
) -> dict[str, str]:
    """{task name: category} for the task files in `path` (see `task_category`).

    Files that are not valid JSON objects are skipped with one warning each. This reads the files
    again; it is separate from `load_ni_tasks` so that the examples keep the plain
    `dict[task, list[Example]]` shape.
    """
    files = _select(_task_files(path), tasks, path)
    out: dict[str, str] = {}
    for name, file in files.items():
        data, reason = _read_json(file)
        if reason is None and not isinstance(data, dict):
            reason = "top level is not a JSON object"
        if reason is not None:
            warn(f"skipping Natural Instructions task file {file.name}: {reason}")
            continue
        out[name] = task_category(data)
    return out


# ---------------------------------------------------------------------------------------------
# instances -> Examples


def _definition(value: Any) -> str | None:
    """Definition text from a string or a list of strings; None when malformed or empty."""
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = value
    else:
        return None
    text = "\n".join(p.strip() for p in parts if p.strip())
    return text or None


def _outputs(value: Any) -> list[str] | None:
    """Non-empty outputs from a list of strings or a plain string; None when malformed."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return [v for v in value if v.strip()]


def format_positive_examples(definition: str, positives: list[tuple[str, str]]) -> str:
    """The instruction text: the definition, then each positive example as input/output lines."""
    blocks = [definition]
    for inp, out in positives:
        blocks.append(f"Example input: {inp.strip()}\nExample output: {out.strip()}")
    return "\n\n".join(blocks)


def _positive_examples(value: Any, k: int) -> list[tuple[str, str]]:
    """The first k well-formed positive examples (malformed entries are passed over)."""
    if k <= 0 or not isinstance(value, list):
        return []
    out: list[tuple[str, str]] = []
    for ex in value:
        if len(out) == k:
            break
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            continue
        outputs = _outputs(ex.get("output"))
        if outputs:
            out.append((ex["input"], outputs[0]))
    return out


def _instance_problem(inst: Any) -> str | None:
    if not isinstance(inst, dict):
        return "not an object"
    if not isinstance(inst.get("input"), str):
        return "missing or non-string input"
    if "output" not in inst:
        return "missing output"
    outputs = _outputs(inst["output"])
    if outputs is None:
        return "output of wrong type"
    if not outputs:
        return "empty output"
    return None


def _make_example(task: str, instruction: str, inp: str, outputs: list[str], uid: Any, i: int) -> Example:
    return Example(
        instruction=instruction,
        context=inp,
        response=outputs[0],
        label=task,
        references=tuple(outputs),
        uid=str(uid) if uid not in (None, "") else f"{task}-{i}",
    )


def _cap(examples: list[Example], cap: int | None, seed: int, task: str) -> list[Example]:
    """A seeded random subset of at most `cap` examples, kept in file order.

    The generator is seeded with (seed, task), so a task's subset does not depend on which
    other tasks are loaded with it.
    """
    if cap is None or len(examples) <= cap:
        return examples
    rng = random.Random(f"{seed}:{task}")
    keep = sorted(rng.sample(range(len(examples)), cap))
    return [examples[i] for i in keep]


def _check_options(max_instances_per_task: int | None, num_positive_examples: int) -> None:
    if max_instances_per_task is not None and max_instances_per_task < 1:
        raise DataError(f"max_instances_per_task must be at least 1 (got {max_instances_per_task})")
    if num_positive_examples < 0:
        raise DataError(f"num_positive_examples must be 0 or more (got {num_positive_examples})")


def _file_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "top level is not a JSON object"
    if "Definition" not in data:
        return "missing 'Definition'"
    if _definition(data["Definition"]) is None:
        return "'Definition' must be a non-empty string or list of strings"
    if "Instances" not in data:
        return "missing 'Instances'"
    if not isinstance(data["Instances"], list):
        return "'Instances' must be a list"
    if not data["Instances"]:
        return "no instances"
    return None


def _load_task_file(
    task: str, file: Path, num_positive_examples: int, warn: Warn
) -> list[Example] | None:
    """The examples of one task file, or None (after one warning) when the file is unusable."""
    data, reason = _read_json(file)
    if reason is None:
        reason = _file_problem(data)
    if reason is not None:
        warn(f"skipping Natural Instructions task file {file.name}: {reason}")
        return None

    definition = _definition(data["Definition"])
    positives = _positive_examples(data.get("Positive Examples"), num_positive_examples)
    instruction = format_positive_examples(definition, positives)

    examples: list[Example] = []
    problems: Counter[str] = Counter()
    for i, inst in enumerate(data["Instances"]):
        problem = _instance_problem(inst)
        if problem is not None:
            problems[problem] += 1
            continue
        examples.append(
            _make_example(task, instruction, inst["input"], _outputs(inst["output"]), inst.get("id"), i)
        )

    n_bad = sum(problems.values())
    if not examples:
        why = ", ".join(f"{n} {p}" for p, n in problems.most_common())
        warn(f"skipping Natural Instructions task file {file.name}: no usable instances ({why})")
        return None
    if n_bad:
        why = ", ".join(f"{n} {p}" for p, n in problems.most_common())
        warn(f"{file.name}: skipped {n_bad} of {len(data['Instances'])} instances ({why})")
    return examples


def load_ni_tasks(
    path: str | Path,
    *,
    tasks: list[str] | None = None,
    max_instances_per_task: int | None = None,
    num_positive_examples: int = 0,
    seed: int = 0,
    warn: Warn = print,
) -> dict[str, list[Example]]:
    """Load SNI v2 task files from a folder: {task name: examples}, tasks in name order.

    `path` is a folder of task files (or an SNI checkout root with a `tasks/` folder).
    `tasks` restricts loading to these names (file stems; an unknown name is an error).
    `max_instances_per_task` keeps a seeded random subset (see `_cap`), drawn after malformed
    instances are dropped. `num_positive_examples` appends the task's first k positive examples
    to the instruction. A malformed file is skipped with one `warn` line; malformed instances are
    skipped and counted in one `warn` line per file. Raises `DataError` when nothing is usable.
    """
    _check_options(max_instances_per_task, num_positive_examples)
    files = _select(_task_files(path), tasks, path)
    out: dict[str, list[Example]] = {}
    for task, file in files.items():
        examples = _load_task_file(task, file, num_positive_examples, warn)
        if examples is not None:
            out[task] = _cap(examples, max_instances_per_task, seed, task)
    if not out:
        raise DataError(f"no usable Natural Instructions task in {path} ({len(files)} file(s) skipped)")
    return out


# ---------------------------------------------------------------------------------------------
# the hub copy


def ni_examples_from_rows(
    rows: Iterable[dict],
    *,
    tasks: list[str] | None = None,
    max_instances_per_task: int | None = None,
    seed: int = 0,
    warn: Warn = print,
) -> dict[str, list[Example]]:
    """Examples from flat rows with fields `task_name`, `definition`, `inputs`, `targets` (and
    optionally `id`), the layout of the hub copy `Muennighoff/natural-instructions`.

    Each row has one target string, so references hold that one answer. Malformed rows are
    skipped and counted in one warning.
    """
    _check_options(max_instances_per_task, 0)
    wanted = set(tasks) if tasks is not None else None
    grouped: dict[str, list[Example]] = defaultdict(list)
    bad = 0
    for i, row in enumerate(rows):
        task = row.get("task_name") if isinstance(row, dict) else None
        if not isinstance(task, str) or not task:
            bad += 1
            continue
        if wanted is not None and task not in wanted:
            continue
        definition = _definition(row.get("definition"))
        outputs = _outputs(row.get("targets"))
        if definition is None or not isinstance(row.get("inputs"), str) or not outputs:
            bad += 1
            continue
        grouped[task].append(_make_example(task, definition, row["inputs"], outputs, row.get("id"), i))
    if bad:
        warn(f"Natural Instructions rows: skipped {bad} malformed row(s)")
    if wanted is not None:
        missing = sorted(wanted - set(grouped))
        if missing:
            raise DataError(
                f"unknown Natural Instructions task(s): {', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''} ({len(grouped)} requested tasks found)"
            )
    if not grouped:
        raise DataError("no usable Natural Instructions rows")
    return {t: _cap(grouped[t], max_instances_per_task, seed, t) for t in sorted(grouped)}


def load_ni_from_hub(
    dataset_id: str = "Muennighoff/natural-instructions",
    split: str = "train",
    *,
    tasks: list[str] | None = None,
    max_instances_per_task: int | None = None,
    seed: int = 0,
    warn: Warn = print,
) -> dict[str, list[Example]]:
    """Load SNI from the Hugging Face hub (needs the internet; not exercised by the tests).

    Rows are mapped by `ni_examples_from_rows`. The hub copy has no `Categories` and no positive
    examples, and each row holds a single target. Any failure to fetch becomes a `DataError`.
    """
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, split=split)
        if tasks is not None:
            wanted = set(tasks)
            ds = ds.filter(lambda name: name in wanted, input_columns="task_name")
    except Exception as e:  # the hub, the network and the cache fail in many ways
        raise DataError(
            f"cannot load {dataset_id} (split {split}) from the hub (offline?): {type(e).__name__}: {e}"
        ) from e
    return ni_examples_from_rows(
        ds, tasks=tasks, max_instances_per_task=max_instances_per_task, seed=seed, warn=warn
    )
