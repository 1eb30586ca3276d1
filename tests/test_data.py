import json
from collections import Counter

import numpy as np
import pytest
from conftest import small_cfg

from fedlora.data.examples import Example
from fedlora.data.federated import build_federated_data, load_examples
from fedlora.data.partition import dirichlet, iid, partition, shards, by_label
from fedlora.data.prompts import IGNORE, PromptFormatter
from fedlora.data.sources import read_records, to_examples
from fedlora.errors import DataError

LABELS = [f"c{i % 5}" for i in range(500)]


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "label", "shards"])
def test_every_example_in_exactly_one_client(kind):
    parts = partition(kind, LABELS, 5, seed=3, alpha=0.5)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))
    if kind != "label":
        assert sorted(flat) == list(range(len(LABELS)))


def test_dirichlet_reproducible_and_skewed_by_alpha():
    assert dirichlet(LABELS, 5, 0.5, seed=1) == dirichlet(LABELS, 5, 0.5, seed=1)
    assert dirichlet(LABELS, 5, 0.5, seed=1) != dirichlet(LABELS, 5, 0.5, seed=2)

    def skew(alpha):  # mean share of each client's most frequent label, over seeds
        vals = []
        for s in range(10):
            for p in dirichlet(LABELS, 5, alpha, seed=s):
                c = Counter(LABELS[i] for i in p)
                vals.append(max(c.values()) / len(p))
        return np.mean(vals)

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.35  # near-uniform over 5 labels
    assert skew(0.1) > 0.6


def test_label_and_shard_partitions_are_non_iid():
    for p in by_label(LABELS, 5, seed=0, labels_per_client=1):
        assert len({LABELS[i] for i in p}) == 1
    for p in shards(LABELS, 5, seed=0, shards_per_client=2):
        assert len({LABELS[i] for i in p}) <= 2


def test_client_train_test_disjoint_and_global_test_held_out(dolly_path):
    cfg = small_cfg()
    examples, unseen = load_examples(cfg)
    data = build_federated_data(cfg, examples, unseen)
    seen = set()
    for c in data.clients:
        train = {id(e) for e in c.train}
        test = {id(e) for e in c.test}
        assert not train & test
        assert not (train | test) & seen
        seen |= train | test
        assert c.train and c.test
    held = {id(e) for v in data.global_test.values() for e in v}
    assert held and not held & seen
    again = build_federated_data(cfg, examples, unseen)
    assert [[e.uid for e in c.train] for c in again.clients] == [[e.uid for e in c.train] for c in data.clients]


def test_response_only_labels(tok):
    fmt = PromptFormatter(tok, "plain", max_length=128)
    ex = Example("Say hi", "", "hello there", "x")
    enc = fmt.encode(ex)
    n_prompt = len(tok(fmt.prompt_text(ex), add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE] * n_prompt
    resp = [t for t in enc.labels if t != IGNORE]
    assert tok.decode(resp[:-1]) == "hello there" and resp[-1] == tok.eos_token_id
    assert enc.input_ids[n_prompt:] == resp


def test_truncation_keeps_response_and_prompt_tail(tok):
    fmt = PromptFormatter(tok, "plain", max_length=64)
    enc = fmt.encode(Example("Q?", "x" * 500, "the answer", "x"))
    assert len(enc.input_ids) <= 64
    resp = [t for t in enc.labels if t != IGNORE]
    assert tok.decode(resp[:-1]) == "the answer"
    assert tok.decode(enc.input_ids[: len(enc.input_ids) - len(resp)]).endswith("### Response:\n")


def test_bad_rows_are_counted_and_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"instruction": "a", "response": "b", "category": "k"}, {"instruction": 3, "response": "b"},
            {"response": "b"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    warnings = []
    recs = read_records(str(p), warn=warnings.append)
    ex = to_examples(recs, {"instruction": "instruction", "response": "response", "label": "category"},
                     source=str(p), warn=warnings.append)
    assert len(ex) == 1 and len(warnings) == 2
    assert "1 invalid line" in warnings[0] and "skipped 2 of 3" in warnings[1]


def test_no_usable_rows_is_one_clear_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(DataError, match="no usable rows"):
        to_examples(read_records(str(p)), {"instruction": "instruction", "response": "response"}, source=str(p),
                    warn=lambda m: None)


def test_more_clients_than_examples():
    with pytest.raises(DataError, match="clients=20"):
        partition("iid", LABELS[:10], 20, seed=0)
