import json
from pathlib import Path

import pytest

from fedlora.data.examples import Example
from fedlora.data.natural_instructions import (
    group_tasks_by_category,
    list_ni_tasks,
    load_ni_from_hub,
    load_ni_task_categories,
    load_ni_tasks,
    ni_examples_from_rows,
    one_task_per_client,
    read_split,
    task_category,
    unseen_tasks,
)
from fedlora.errors import DataError

NI = Path(__file__).resolve().parents[2] / "shared" / "data" / "natural-instructions"
TASKS = NI / "tasks"
LIST_CAT = "task648_answer_generation"  # Categories is a list; in the official test split
STR_CAT = "task363_sst2_polarity_classification"  # shortened header: Categories is a string
MULTI_REF = "task002_quoref_answer_generation"  # some instances have several outputs

real_data = pytest.mark.skipif(not TASKS.is_dir(), reason="shared Natural Instructions data not present")


def collect():
    lines = []
    return lines, lines.append


def write_task(folder: Path, name: str, obj) -> Path:
    path = folder / f"{name}.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def good_task(n=3, category="Summarization"):
    return {
        "Definition": ["Summarize the text."],
        "Categories": [category],
        "Positive Examples": [{"input": "a b c", "output": "a", "explanation": "x"}],
        "Instances": [{"id": f"t-{i}", "input": f"text {i}", "output": [f"sum {i}"]} for i in range(n)],
    }


# ---------------------------------------------------------------------------------------------
# real files


@real_data
def test_real_list_and_string_categories():
    lines, warn = collect()
    data = load_ni_tasks(TASKS, tasks=[LIST_CAT, STR_CAT], warn=warn)
    assert set(data) == {LIST_CAT, STR_CAT}
    assert lines == []
    raw = json.loads((TASKS / f"{STR_CAT}.json").read_text())
    assert isinstance(raw["Categories"], str)
    assert task_category(raw) == "Basic Sentiment Analysis"
    assert task_category(TASKS / f"{LIST_CAT}.json") == "Coreference Resolution"
    cats = load_ni_task_categories(TASKS, tasks=[LIST_CAT, STR_CAT], warn=warn)
    assert cats == {LIST_CAT: "Coreference Resolution", STR_CAT: "Basic Sentiment Analysis"}

    ex = data[STR_CAT][0]
    assert isinstance(ex, Example)
    assert ex.label == STR_CAT
    assert ex.instruction.startswith("In this task, you are given sentences from movie reviews")
    assert ex.response in {"POS", "NEG"}  # `output` is a plain string in this file
    assert ex.references == (ex.response,)
    assert ex.uid.startswith("task363-")
    assert len(data[STR_CAT]) == len(raw["Instances"])
    first = raw["Instances"][0]
    assert (ex.context, ex.uid) == (first["input"], first["id"])


@real_data
def test_real_references_kept():
    data = load_ni_tasks(TASKS, tasks=[MULTI_REF], warn=lambda m: None)
    raw = json.loads((TASKS / f"{MULTI_REF}.json").read_text())
    by_id = {i["id"]: i for i in raw["Instances"]}
    multi = [e for e in data[MULTI_REF] if len(e.references) > 1]
    assert multi
    for e in multi[:20]:
        assert e.references == tuple(by_id[e.uid]["output"])
        assert e.response == e.references[0]


@real_data
def test_real_cap_is_seeded_random_subset():
    kw = dict(tasks=[STR_CAT, LIST_CAT], max_instances_per_task=50, warn=lambda m: None)
    a = load_ni_tasks(TASKS, seed=1, **kw)
    b = load_ni_tasks(TASKS, seed=1, **kw)
    c = load_ni_tasks(TASKS, seed=2, **kw)
    full = load_ni_tasks(TASKS, tasks=[STR_CAT], warn=lambda m: None)[STR_CAT]
    assert all(len(v) == 50 for v in a.values())
    assert [e.uid for e in a[STR_CAT]] == [e.uid for e in b[STR_CAT]]
    assert [e.uid for e in a[STR_CAT]] != [e.uid for e in c[STR_CAT]]
    assert [e.uid for e in a[STR_CAT]] != [e.uid for e in full[:50]]  # not just the first N
    # a task's subset does not depend on the other tasks loaded with it
    alone = load_ni_tasks(TASKS, tasks=[STR_CAT], seed=1, max_instances_per_task=50, warn=lambda m: None)
    assert [e.uid for e in alone[STR_CAT]] == [e.uid for e in a[STR_CAT]]


@real_data
def test_real_empty_outputs_skipped_with_one_warning():
    lines, warn = collect()
    name = "task511_reddit_tifu_long_text_summarization"
    data = load_ni_tasks(TASKS, tasks=[name], warn=warn)
    assert len(lines) == 1 and name in lines[0] and "6 empty output" in lines[0]
    assert len(data[name]) == 1100 - 6
    assert all(e.response.strip() for e in data[name])


@real_data
def test_real_positive_examples_in_instruction():
    data = load_ni_tasks(TASKS, tasks=[STR_CAT], num_positive_examples=2, max_instances_per_task=3, warn=print)
    raw = json.loads((TASKS / f"{STR_CAT}.json").read_text())
    ins = data[STR_CAT][0].instruction
    assert ins.count("Example input:") == 2 and ins.count("Example output:") == 2
    assert raw["Positive Examples"][0]["input"].strip() in ins
    assert ins.startswith(raw["Definition"][0].strip())
    plain = load_ni_tasks(TASKS, tasks=[STR_CAT], max_instances_per_task=3, warn=print)[STR_CAT][0]
    assert "Example input:" not in plain.instruction


@real_data
def test_real_root_folder_and_all_tasks_load():
    lines, warn = collect()
    names = list_ni_tasks(NI)  # the root works too (uses its tasks/ folder)
    assert len(names) == 77
    data = load_ni_tasks(NI, max_instances_per_task=5, warn=warn)
    assert len(data) == 77
    assert len(lines) == 1  # only task511's empty outputs
    cats = load_ni_task_categories(NI, warn=warn)
    assert set(cats) == set(names) and "unknown" not in cats.values()


@real_data
def test_real_official_split_and_unseen_tasks():
    test = read_split(NI / "splits", "test")
    assert len(test) == 119 and test == read_split(NI / "splits" / "default" / "test_tasks.txt", "ignored")
    train = read_split(NI / "splits" / "default", "train")
    assert len(train) == 756
    available = list_ni_tasks(TASKS)
    clients = one_task_per_client([t for t in available if t in set(train)], 10, seed=0)
    unseen = unseen_tasks(available, clients, split_test=test, n_holdout=5, seed=0)
    assert unseen == sorted(set(available) & set(test))
    assert len(unseen) == 3 and not set(unseen) & set(clients)


# ---------------------------------------------------------------------------------------------
# malformed files


def test_malformed_files_skipped_with_one_warning_each(tmp_path):
    write_task(tmp_path, "good", good_task())
    write_task(tmp_path, "badjson", "{not json")
    write_task(tmp_path, "noinst", {"Definition": ["x"], "Categories": ["c"]})
    write_task(tmp_path, "nodef", {"Categories": ["c"], "Instances": good_task()["Instances"]})
    write_task(tmp_path, "wrongtype", {"Definition": 3, "Instances": good_task()["Instances"]})
    write_task(tmp_path, "listtop", [1, 2])
    lines, warn = collect()
    data = load_ni_tasks(tmp_path, warn=warn)
    assert list(data) == ["good"]
    assert len(lines) == 5
    for name, reason in [
        ("badjson", "invalid JSON"),
        ("noinst", "missing 'Instances'"),
        ("nodef", "missing 'Definition'"),
        ("wrongtype", "'Definition'"),
        ("listtop", "not a JSON object"),
    ]:
        assert sum(f"{name}.json" in line and reason in line for line in lines) == 1, (name, lines)
    assert all("\n" not in line for line in lines)


def test_bad_instances_counted_in_one_warning(tmp_path):
    obj = good_task(n=4)
    obj["Instances"] += [
        {"id": "e1", "input": "x", "output": []},
        {"id": "e2", "input": "x", "output": ["", "  "]},
        {"id": "e3", "input": "x"},
        {"id": "e4", "input": "x", "output": [1]},
        "not an instance",
    ]
    write_task(tmp_path, "t", obj)
    lines, warn = collect()
    data = load_ni_tasks(tmp_path, warn=warn)
    assert [e.uid for e in data["t"]] == ["t-0", "t-1", "t-2", "t-3"]
    assert len(lines) == 1 and "t.json" in lines[0] and "skipped 5 of 9" in lines[0]


def test_string_definition_and_categories_and_partial_references(tmp_path):
    obj = good_task(n=1)
    obj["Definition"] = "Plain definition."
    obj["Categories"] = "Summarization"
    obj["Instances"] = [{"id": "a", "input": "in", "output": ["", "first", "second"]}]
    write_task(tmp_path, "t", obj)
    (ex,) = load_ni_tasks(tmp_path, warn=print)["t"]
    assert ex.instruction == "Plain definition."
    assert ex.response == "first" and ex.references == ("first", "second")
    assert task_category(obj) == "Summarization"
    assert task_category({"Definition": "x"}) == "unknown"


def test_nothing_usable_raises(tmp_path):
    write_task(tmp_path, "bad", "{")
    write_task(tmp_path, "empty", {"Definition": ["d"], "Instances": [{"id": "1", "input": "x", "output": []}]})
    lines, warn = collect()
    with pytest.raises(DataError, match="no usable"):
        load_ni_tasks(tmp_path, warn=warn)
    assert len(lines) == 2


def test_missing_folder_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_ni_tasks(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no Natural Instructions task files"):
        load_ni_tasks(tmp_path)
    write_task(tmp_path, "a", good_task())
    write_task(tmp_path, "b", good_task())
    with pytest.raises(DataError, match=r"task999_nope.*2 tasks available"):
        load_ni_tasks(tmp_path, tasks=["a", "task999_nope"])
    with pytest.raises(DataError):
        load_ni_tasks(tmp_path, max_instances_per_task=0)


# ---------------------------------------------------------------------------------------------
# hub rows (offline)


def test_rows_mapping_and_hub_failure(monkeypatch):
    rows = [
        {"task_name": "t1", "id": "t1-a", "definition": "Do it.", "inputs": "x", "targets": "y"},
        {"task_name": "t1", "id": "t1-b", "definition": "Do it.", "inputs": "x2", "targets": "y2"},
        {"task_name": "t2", "id": "t2-a", "definition": "Other.", "inputs": "z", "targets": ""},
        {"task_name": "t2", "id": "t2-b", "definition": "Other.", "inputs": "z", "targets": "w"},
    ]
    lines, warn = collect()
    data = ni_examples_from_rows(rows, warn=warn)
    assert list(data) == ["t1", "t2"] and len(data["t1"]) == 2 and len(data["t2"]) == 1
    assert data["t1"][0] == Example("Do it.", "x", "y", "t1", ("y",), "t1-a")
    assert len(lines) == 1
    with pytest.raises(DataError, match="t3"):
        ni_examples_from_rows(rows, tasks=["t3"], warn=warn)

    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"from the hub \(offline\?\)"):
        load_ni_from_hub()


# ---------------------------------------------------------------------------------------------
# partitions and unseen tasks


def test_one_task_per_client():
    tasks = [f"task{i}" for i in range(10)]
    a = one_task_per_client(tasks, 6, seed=3)
    assert len(a) == 6 and len(set(a)) == 6 and set(a) <= set(tasks)
    assert a == one_task_per_client(list(reversed(tasks)), 6, seed=3)
    assert one_task_per_client(tasks, 10, seed=0) != one_task_per_client(tasks, 10, seed=1)
    with pytest.raises(DataError, match="needs 11 distinct tasks, only 10"):
        one_task_per_client(tasks, 11, seed=0)
    with pytest.raises(DataError):
        one_task_per_client(tasks + tasks, 11, seed=0)  # duplicates do not count


def test_group_tasks_by_category():
    cats = {f"qa{i}": "QA" for i in range(6)}
    cats |= {f"sum{i}": "Sum" for i in range(4)}
    cats |= {"tr0": "Tr", "tr1": "Tr", "dlg0": "Dlg"}
    groups = group_tasks_by_category(cats, tasks_per_client=2, num_clients=5, seed=0)
    assert len(groups) == 5 and all(len(g) == 2 for g in groups)
    flat = [t for g in groups for t in g]
    assert len(set(flat)) == len(flat)
    assert all(len({cats[t] for t in g}) == 1 for g in groups)  # enough same-category groups
    assert {cats[g[0]] for g in groups} >= {"QA", "Sum", "Tr"}  # spread over categories
    assert groups == group_tasks_by_category(dict(reversed(cats.items())), 2, 5, seed=0)

    # 6 clients x 2 tasks: the 6 pure groups (QA 3, Sum 2, Tr 1) suffice; 7 -> one mixed from leftovers
    all_groups = group_tasks_by_category(cats, 2, 6, seed=1)
    assert all(len({cats[t] for t in g}) == 1 for g in all_groups)
    more = group_tasks_by_category({**cats, "x0": "X"}, 2, 7, seed=1)
    assert sum(len({cats.get(t, "X") for t in g}) > 1 for g in more) == 1
    with pytest.raises(DataError, match="need 14 distinct tasks"):
        group_tasks_by_category(cats, 2, 7, seed=0)


def test_unseen_tasks_rule():
    available = [f"t{i}" for i in range(10)]
    train = ["t0", "t1", "t2"]
    # official test split meets the candidates: use it (minus training tasks)
    assert unseen_tasks(available, train, split_test=["t1", "t5", "t7", "zz"], n_holdout=1, seed=0) == ["t5", "t7"]
    # no overlap with the official split: seeded hold-out
    a = unseen_tasks(available, train, split_test=["zz", "t0"], n_holdout=4, seed=0)
    assert len(a) == 4 and not set(a) & set(train)
    assert a == unseen_tasks(available, train, split_test=None, n_holdout=4, seed=0)
    assert unseen_tasks(available, train, split_test=None, n_holdout=0, seed=0) == []
    for seed in range(20):
        assert not set(unseen_tasks(available, train, split_test=None, n_holdout=7, seed=seed)) & set(train)
    with pytest.raises(DataError, match="cannot hold out 8"):
        unseen_tasks(available, train, split_test=None, n_holdout=8, seed=0)


def test_read_split_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_split(tmp_path / "nope", "test")
    with pytest.raises(DataError, match="no split list 'test'"):
        read_split(tmp_path, "test")
    (tmp_path / "test_tasks.txt").write_text("# comment\ntask1\n\n task2.json \n")
    assert read_split(tmp_path, "test") == ["task1", "task2"]
