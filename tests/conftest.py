import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from fedlora.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOLLY = SHARED / "data" / "databricks-dolly-15k.jsonl"


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def base(tok):
    return tiny_model(len(tok))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random model saved as a model directory, for the CLI (`--set model.name=DIR`)."""
    d = tmp_path_factory.mktemp("tiny_model")
    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def small_cfg(*overrides: str):
    """A tiny-but-real config: real Dolly rows, 3 clients, 2 rounds, a few steps."""
    return load_config(None, [
        f"data.path={DOLLY}", "max_rows=240", "clients=3", "rounds=2", "global_steps=2", "personal_steps=2",
        "train.batch_size=2", "max_length=64", "max_examples_per_client=4", "max_global_examples=8",
        "max_gen_examples=2", "max_new_tokens=4", "global_test_per_label=2", "lora.dropout=0.0", *overrides,
    ])


def record_uploads(sim):
    """The updates the simulator's server is given from now on, in the list returned (filled as it aggregates)."""
    seen = []
    orig = sim.server.aggregate

    def spy(updates):
        seen.extend(updates)
        return orig(updates)

    sim.server.aggregate = spy
    return seen


@pytest.fixture
def one_thread():
    """The tiny model runs far faster on one thread when the machine's cores are busy; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dolly_path():
    assert DOLLY.is_file(), f"the shared Dolly file is missing: {DOLLY}"
    return DOLLY


@pytest.fixture
def spec(tmp_path):
    """A study spec over the tiny model: experiment `small` (two methods, seeds 0-1) and `both_refs`."""
    model = tmp_path / "tiny"
    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    (tmp_path / "base.yaml").write_text(
        f"model: {{name: '{model}', device: cpu}}\n"
        f"data: {{path: '{DOLLY}', max_rows: 200, max_length: 48, global_test_per_label: 2}}\n"
        "federation: {clients: 2, rounds: 1}\n"
        "train: {global_steps: 1, personal_steps: 1, batch_size: 2}\n"
        "eval: {max_examples_per_client: 2, max_global_examples: 4, generate: false}\n"
        "output: {save_adapters: false, plots: false}\n")
    (tmp_path / "spec.yaml").write_text(
        "seeds: [0, 1]\npaired_with: fedit\nexperiments:\n"
        f"  small:\n    description: two methods\n    config: {tmp_path / 'base.yaml'}\n"
        "    methods: [fedit, {label: fedlora_cols, method: fedlora_opt, set: [norm_axis_a=cols]}]\n"
        f"  both_refs:\n    description: paired with two references\n    config: {tmp_path / 'base.yaml'}\n"
        "    paired_with: [fedit, fedlora_opt]\n    seeds: [0]\n    methods: [fedit, fedlora_opt, fedsa]\n")
    return tmp_path
