"""End to end with the real embedded SmolLM2-135M-Instruct and real Dolly rows (small sizes)."""

import json

import torch
from conftest import DOLLY
from peft import PeftModel

from fedlora.cli import main
from fedlora.model import ensure_embedded_model, load_base_model, load_tokenizer

SMALL = ["clients=2", "rounds=1", "global_steps=2", "personal_steps=1", "train.batch_size=2", "max_rows=80",
         "max_length=96", "max_examples_per_client=2", "max_global_examples=8", "max_gen_examples=1",
         "max_new_tokens=8", "global_test_per_label=1", "eval.batch_size=4"]


def test_compare_two_methods_on_smollm2(tmp_path, capsys):
    out = tmp_path / "cmp"
    sets = [a for s in SMALL + [f"data.path={DOLLY}"] for a in ("--set", s)]
    code = main(["compare", "--methods", "fedit,fedlora_opt", "--out", str(out), *sets])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| base model |" in printed and "| fedit |" in printed and "| fedlora_opt |" in printed
    summary = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["base model", "fedit", "fedlora_opt"]
    for r in summary["rows"]:
        assert 0 < r["global_loss"] < 20 and 0 < r["local_loss"] < 20 and r["global_rouge_l"] is not None
    assert (out / "curves.png").stat().st_size > 0 and (out / "per_client_local.png").stat().st_size > 0
    # the saved adapters load with plain PEFT and give the logits the project computed
    run = out / "fedlora_opt" / "seed_0"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["eval"]["local"]["per_client"]
    ensure_embedded_model()
    tok = load_tokenizer("smollm2")
    base = load_base_model("smollm2", torch.device("cpu"), torch.float32)
    x = tok("Hello, how are you?", return_tensors="pt").input_ids
    plain = base(x).logits
    model = PeftModel.from_pretrained(base, run / "adapters" / "clients" / "client_1")
    assert model.peft_config["default"].r == 8
    assert not torch.allclose(model(x).logits, plain)  # the adapter is not a no-op


def test_own_data_federation_on_smollm2(tmp_path):
    """Two clients with their own files of real Dolly rows and a server that reads none, the real SmolLM2, the
    real ServerApp and ClientApp over Flower's wire format (LoopbackGrid): global (federated) and local results."""
    from loopback_grid import LoopbackGrid

    from fedlora.config import load_config
    from fedlora.flower import client_app
    from fedlora.flower.server_app import run_flower
    from fedlora.flower.settings import RunSettings

    rows = [line for i, line in enumerate(open(DOLLY)) if i % 211 == 0][:40]
    nodes = {}
    for k in range(2):
        f = tmp_path / f"site{k}.jsonl"
        f.write_text("".join(rows[k * 20:(k + 1) * 20]))
        nodes[10 + k] = {"data-path": str(f), "client-name": f"site-{k}", "state-dir": str(tmp_path / "state")}
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(None, [*[s for s in SMALL if not s.startswith(("clients", "max_rows", "global_steps"))],
                             "clients=2", "global_steps=1", "max_length=64", "model.threads=2",
                             f"data.path={tmp_path / 'not-on-the-server.jsonl'}", f"output.dir={out}",
                             "output.plots=false", "min_test_per_client=2"])
    threads = torch.get_num_threads()
    try:
        with LoopbackGrid(client_app.app, nodes) as grid:
            run_flower(grid, cfg, RunSettings(client_data="own", round_timeout=300.0, node_wait_timeout=5.0), out)
    finally:
        torch.set_num_threads(threads)
    result = json.loads((out / "results.json").read_text())
    ev = result["history"][-1]["eval"]
    assert ev["global"] == ev["federated"] and ev["federated"]["clients"] == 2
    assert 0 < ev["global"]["loss"] < 20 and all(0 < c["loss"] < 20 for c in ev["local"]["per_client"])
    assert result["base_eval"]["global"]["loss"] > 0 and "| base model |" in (out / "results.md").read_text()


def test_generations_do_not_depend_on_the_generation_batch():
    """eval.gen_batch_size only changes the cost: left-padded prompts give the same greedy generations with an
    adapter that changes the model (benchmarks/eval_cost.py measures the cost)."""
    from fedlora.adapters import AdapterModel
    from fedlora.config import load_config
    from fedlora.data.federated import load_examples
    from fedlora.data.prompts import PromptFormatter
    from fedlora.evaluate import generate

    cfg = load_config(None, [f"data.path={DOLLY}", "max_rows=40", "max_length=96"])
    examples, _ = load_examples(cfg, warn=lambda m: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 when the cores are busy
    tok = load_tokenizer("smollm2")
    am = AdapterModel(load_base_model("smollm2", torch.device("cpu"), torch.float32), "lora", cfg.lora, seed=0)
    fmt = PromptFormatter(tok, cfg.data.template, cfg.data.max_length)
    rows = examples[:4]
    before = generate(am, fmt, rows, 6, 4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in am.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.1)
    one, four = (generate(am, fmt, rows, 6, b) for b in (1, 4))
    torch.set_num_threads(threads)
    assert one == four and all(one)
    assert one != before  # the adapter is active
