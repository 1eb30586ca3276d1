"""Natural Instructions through the config path: task choice, task partitions, unseen tasks, scoring."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


from fedlora.cli import main  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.data.federated import build_federated_data, load_examples  # noqa: E402
from fedlora.data.natural_instructions import load_ni_task_categories, read_split  # noqa: E402
from fedlora.errors import DataError  # noqa: E402
from fedlora.evaluate import rouge_l  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NI = REPO.parent / "shared" / "data" / "natural-instructions"
real_data = pytest.mark.skipif(not (NI / "tasks").is_dir(), reason="shared Natural Instructions data not present")
QUIET = dict(warn=lambda _m: None)


def ni_cfg(*overrides, path=NI):
    return load_config(None, [
        "data.source=natural_instructions", f"data.path={path}", "clients=4", "partition=task",
        "max_instances_per_task=40", "global_test_per_label=4", *overrides,
    ])


def federate(cfg):
    examples, unseen = load_examples(cfg, **QUIET)
    return examples, unseen, build_federated_data(cfg, examples, unseen)


def client_tasks(client):
    return {e.label for e in client.train} | {e.label for e in client.test}


def official_test_tasks():
    present = {p.stem for p in (NI / "tasks").glob("*.json")}
    return set(read_split(NI / "splits", "test")) & present


# ---------------------------------------------------------------------------------------------
# the config path


@real_data
def test_config_path_loads_ni_with_diverse_tasks_and_official_unseen_tasks():
    cfg = ni_cfg()
    examples, unseen = load_examples(cfg, **QUIET)
    train_tasks = {e.label for e in examples}
    assert len(train_tasks) == 4
    categories = load_ni_task_categories(NI, tasks=sorted(train_tasks), **QUIET)
    assert len(set(categories.values())) == 4  # one task from each of four categories
    assert set(unseen) == official_test_tasks()
    assert not train_tasks & set(unseen)
    assert all(len(v) <= 40 for v in unseen.values())
    assert max(Counter(e.label for e in examples).values()) <= 40
    # each example keeps all its references for scoring, the first is the training target
    assert all(e.references and e.references[0] == e.response for e in examples)
    # seeded: the same config gives the same tasks, another seed may not
    again, _ = load_examples(ni_cfg(), **QUIET)
    assert [e.uid for e in again] == [e.uid for e in examples]


@real_data
def test_default_path_for_ni_is_the_shared_folder(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(None, ["data.source=natural_instructions", "clients=2", "max_instances_per_task=10"])
    examples, unseen = load_examples(cfg, **QUIET)
    assert len({e.label for e in examples}) == 2 and unseen


@real_data
def test_one_task_per_client():
    _, unseen, data = federate(ni_cfg())
    per_client = [client_tasks(c) for c in data.clients]
    assert all(len(t) == 1 for t in per_client)
    assert len(set().union(*per_client)) == 4  # four clients, four different tasks
    assert set(data.global_test) == set().union(*per_client)


@real_data
def test_unseen_tasks_are_never_trained_or_tested_on_by_a_client():
    # even when the user lists an official test task as a training task
    listed = ["task648_answer_generation", "task1290_xsum_summarization", "task363_sst2_polarity_classification"]
    for cfg in (ni_cfg(), ni_cfg("clients=3", f"data.tasks={json.dumps(listed)}"),
                ni_cfg("partition=dirichlet", "data.alpha=1.0"), ni_cfg("partition=iid")):
        _, unseen, data = federate(cfg)
        if cfg.data.tasks:
            assert "task648_answer_generation" not in unseen  # listed for training, so not unseen
        assert unseen and set(data.unseen_test) == set(unseen)
        seen = set().union(*(client_tasks(c) for c in data.clients)) | set(data.global_test)
        assert not seen & set(unseen)
        unseen_uids = {e.uid for v in unseen.values() for e in v}
        client_uids = {e.uid for c in data.clients for e in c.train + c.test}
        assert not unseen_uids & client_uids


@real_data
def test_several_tasks_per_client_share_a_category():
    cfg = ni_cfg("clients=3", "labels_per_client=2", "max_instances_per_task=20")
    _, _, data = federate(cfg)
    categories = load_ni_task_categories(NI, **QUIET)
    for c in data.clients:
        tasks = client_tasks(c)
        assert len(tasks) == 2
        assert len({categories[t] for t in tasks}) == 1
    assert len(set().union(*(client_tasks(c) for c in data.clients))) == 6


@real_data
@pytest.mark.parametrize("kind", ["dirichlet", "iid"])
def test_dirichlet_and_iid_over_the_task_label(kind):
    cfg = ni_cfg(f"partition={kind}", "labels_per_client=2", "data.alpha=0.5")
    examples, _, data = federate(cfg)
    tasks = {e.label for e in examples}
    assert len(tasks) == 8
    held = sum(len(v) for v in data.global_test.values())
    assert sum(len(c.train) + len(c.test) for c in data.clients) + held == len(examples)
    if kind == "iid":
        assert all(len(client_tasks(c)) > 1 for c in data.clients)


@real_data
def test_bad_task_lists_are_clear_errors():
    with pytest.raises(DataError, match="unknown or unusable"):
        load_examples(ni_cfg('data.tasks=["task0000_nope"]'), **QUIET)
    five = sorted(p.stem for p in (NI / "tasks").glob("task7*.json"))[:5]
    with pytest.raises(DataError, match="hold only 4"):
        load_examples(ni_cfg(f"data.tasks={json.dumps(five)}"), **QUIET)
    with pytest.raises(DataError, match="training tasks"):
        load_examples(ni_cfg("clients=200"), **QUIET)


def _task(category: str, n: int = 12) -> dict:
    return {"Definition": ["Do it."], "Categories": [category],
            "Instances": [{"id": f"i{i}", "input": f"in {i}", "output": [f"out {i}", f"alt {i}"]} for i in range(n)]}


def test_folder_without_splits_holds_out_seeded_unseen_tasks(tmp_path):
    for i in range(8):
        (tmp_path / f"task{i:03d}_x.json").write_text(json.dumps(_task(f"cat{i % 3}")))
    cfg = ni_cfg("clients=3", "unseen_tasks=2", "global_test_per_label=2", path=tmp_path)
    examples, unseen, data = federate(cfg)
    train = {e.label for e in examples}
    assert len(train) == 3 and len(unseen) == 2 and not train & set(unseen)
    assert all(len(client_tasks(c)) == 1 for c in data.clients)
    assert load_examples(cfg, **QUIET)[1].keys() == unseen.keys()  # seeded
    with pytest.raises(DataError, match="cannot hold out"):
        load_examples(ni_cfg("clients=3", "unseen_tasks=6", path=tmp_path), **QUIET)


def test_rouge_l_takes_the_best_of_several_references():
    refs = ("the cat sat on the mat", "a dog")
    assert rouge_l("a dog", refs) == pytest.approx(1.0)
    assert rouge_l("the cat sat", refs) == pytest.approx(rouge_l("the cat sat", refs[:1]))
    assert rouge_l("the cat sat", refs) > rouge_l("the cat sat", refs[1:])


# ---------------------------------------------------------------------------------------------
# a run end to end on the tiny model


def _ni_tiny_args(tiny_dir, out) -> list[str]:
    """configs/ni.yaml on the tiny model, one short round."""
    sets = [f"data.path={NI}", f"model.name={tiny_dir}", "clients=2", "rounds=1", "global_steps=1",
            "personal_steps=1", "train.batch_size=2", "max_length=64", "max_instances_per_task=20",
            "global_test_per_label=2", "max_examples_per_client=2", "max_global_examples=6", "max_gen_examples=1",
            "max_new_tokens=2", "save_adapters=false", "plots=false"]
    return ["--config", str(REPO / "configs" / "ni.yaml"), "--out", str(out)] + [a for s in sets for a in ("--set", s)]


@real_data
def test_run_on_the_ni_config_reports_unseen_tasks(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", *_ni_tiny_args(tiny_dir, out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    last = result["history"][-1]["eval"]
    assert set(last["unseen"]["per_label"]) == official_test_tasks()
    assert not set(last["unseen"]["per_label"]) & set(last["global"]["per_label"])
    assert result["summary"]["unseen_loss"] is not None
    assert "unseen-task ROUGE-L" in (out / "results.md").read_text()


@real_data
def test_compare_on_the_ni_config(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", *_ni_tiny_args(tiny_dir, out), "--methods", "fedit,fedlora_opt"])
    assert code == 0, capsys.readouterr().err
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"base model", "fedit", "fedlora_opt"}
    for r in rows.values():
        assert r["unseen_loss"] is not None and r["global_loss"] is not None and r["local_loss"] is not None
    assert rows["fedit"]["global_loss"] != rows["fedlora_opt"]["global_loss"]
    assert "unseen-task ROUGE-L" in (out / "results.md").read_text()
