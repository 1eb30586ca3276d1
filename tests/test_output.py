"""What a run prints where it is read (a terminal, a log file), and what it exports for PEFT users.

The run of the module fixture goes through the real CLI in this process with stdout captured: not a terminal,
as under `> run.log`, `nohup` or CI.
"""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from rich.console import Console

from fedlora.adapters import AdapterModel
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.model import EMBEDDED_HUB_ID, _no_gguf_progress_bar, base_model_id
from fedlora.runner import print_table

PHASE_LINE = re.compile(r"^round (\d+) client (\d+) (global|local|joint) phase: (\d+) steps?, loss \d+\.\d{4}, \d+\.\ds "
                        r"\(\d+/\d+ steps, about \S+ left\)$", re.M)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_dir):
    """A 2-round, 3-client fedlora_opt run (sequential pipeline) of the tiny model, its stdout and stderr as a log
    file gets them."""
    from conftest import DOLLY

    out = tmp_path_factory.mktemp("output") / "run"
    sets = [f"model.name={tiny_dir}", f"data.path={DOLLY}", "max_rows=200", "clients=3", "rounds=2",
            "global_steps=2", "personal_steps=1", "train.batch_size=2", "max_length=64", "max_examples_per_client=2",
            "max_global_examples=4", "max_gen_examples=0", "global_test_per_label=2", "output.plots=false",
            "model.threads=1", "method_options.pipeline=sequential"]  # a global and a local phase
    threads = torch.get_num_threads()
    capture = pytest.MonkeyPatch()
    stdout, stderr = io.StringIO(), io.StringIO()
    capture.setattr("sys.stdout", stdout)
    capture.setattr("sys.stderr", stderr)
    try:
        code = main(["run", "--out", str(out), *[x for s in sets for x in ("--set", s)]])
    finally:
        capture.undo()
        torch.set_num_threads(threads)
    assert code == 0, stdout.getvalue() + stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


# ----------------------------------------------------------------------------- output in a log


def test_a_log_gets_no_progress_frames_and_no_cut_headers(logged_run):
    _, out, err = logged_run
    assert "\r" not in out + err and "\x1b[" not in out + err  # no progress-bar frames, no cursor moves
    assert "…" not in out
    table = out[out.index("training rows per client and label"):out.index("global test set")]
    for header in ("client", "brainstorming", "information_extraction", "creative_writing", "train", "test"):
        assert f" {header} |" in table, table  # every header whole (Markdown: the 80 columns rich assumes are too few)


def test_a_log_gets_a_line_per_client_phase(logged_run):
    _, out, _ = logged_run
    phases = PHASE_LINE.findall(out)
    expected = [(str(r), str(c), phase, steps) for r in (1, 2) for phase, steps in (("global", "2"), ("local", "1"))
                for c in range(3)]
    assert phases == expected, out
    assert "loading model" in out  # what the terminal's spinner says is a line in a log


def test_the_joint_pipeline_calls_its_one_phase_joint():
    from fedlora.config.schema import MethodConfig
    from fedlora.core.methods import build_method
    from fedlora.runner import phase_name

    joint, sequential = (build_method("fedlora_opt", MethodConfig(pipeline=p)) for p in ("joint", "sequential"))
    assert phase_name(joint, "global") == "joint"
    assert [phase_name(sequential, p) for p in ("global", "local")] == ["global", "local"]
    assert phase_name(build_method("fedit", MethodConfig()), "global") == "global"


def test_print_table_keeps_a_rich_table_where_it_fits_and_falls_back_to_markdown():
    headers = ["client", "information_extraction", "creative_writing", "train"]
    for width, rich_table in ((120, True), (40, False)):
        console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
        print_table(console, "rows", headers, [[0, 1, 2, 3]])
        text = console.file.getvalue()
        assert "…" not in text and all(h in text for h in headers), text
        assert ("| information_extraction |" in text) is not rich_table, text


def test_the_gguf_conversion_draws_no_progress_bar():
    from transformers import modeling_gguf_pytorch_utils as gguf

    sink = io.StringIO()
    with _no_gguf_progress_bar():
        list(gguf.tqdm(range(3), file=sink, desc="Converting"))
    assert sink.getvalue() == ""
    list(gguf.tqdm(range(3), file=sink, desc="Converting"))  # put back afterwards
    assert "Converting" in sink.getvalue()


# ----------------------------------------------------------------------------- adapters for PEFT users


def test_exported_adapters_name_their_base_model_and_carry_a_model_card(logged_run, tiny_dir):
    run, _, _ = logged_run
    dirs = [run / "adapters" / "global", *(run / "adapters" / "clients" / f"client_{c}" for c in range(3))]
    fingerprint = json.loads((run / "results.json").read_text())["provenance"]["data_fingerprint"]
    for d in dirs:
        raw = (d / "adapter_config.json").read_text()
        config = json.loads(raw)
        assert config["base_model_name_or_path"] == str(tiny_dir.resolve())
        assert config["target_modules"] == sorted(config["target_modules"])
        assert raw == json.dumps(config, indent=2, sort_keys=True)
        card = (d / "README.md").read_text()
        assert card.startswith(f"---\nbase_model: {tiny_dir.resolve()}\nlibrary_name: peft\n"), card
        who = "global" if d.name == "global" else f"client {d.name[-1]}"
        assert f"# fedlora_opt: {who} adapter after round 2" in card
        assert f"fingerprint {fingerprint}" in card and "scores after round 2" in card, card
        assert "base model on the same rows" in card


@pytest.mark.parametrize("kind", ["lora", "magdir", "dora"])
def test_adapter_config_is_canonical_for_every_kind(tok, base, tmp_path, kind):
    cfg = load_config(None, ["lora.target_modules=[v_proj, q_proj, o_proj, k_proj]"])
    am = AdapterModel(base, kind, cfg.lora, seed=0, base_name="smollm2")
    out = am.export_peft(am.init_state, tmp_path / kind)
    raw = (out / "adapter_config.json").read_text()
    config = json.loads(raw)
    assert config["base_model_name_or_path"] == EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert raw == json.dumps(config, indent=2, sort_keys=True)
    assert (out / "README.md").read_text().startswith(f"---\nbase_model: {EMBEDDED_HUB_ID}\nlibrary_name: peft\n")


def test_base_model_id(tiny_dir):
    assert base_model_id("smollm2") == EMBEDDED_HUB_ID
    assert base_model_id("org/some-model") == "org/some-model"
    assert base_model_id(str(tiny_dir)) == str(tiny_dir.resolve())
