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
