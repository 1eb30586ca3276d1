"""A corpus of malformed configs, data files and resume misuse (adds to tests/test_cli.py's cases).

Every case: exit code 2, exactly one line `error: ...` on stderr naming the problem, no traceback, and the
run directory involved (an existing run passed with --overwrite, or the run given to --resume) unchanged:
same files, same bytes, same mtimes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from runkit import save_tiny_model, snapshot, write_data

from fedlora.cli import main

ROW = '{"instruction": "say hi", "context": "", "response": "hi", "category": "open_qa"}\n'


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A saved tiny model, a data file and one finished 2-round run made by the real CLI (in process)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = save_tiny_model(root / "model")
    data = write_data(root / "data.jsonl")
    (root / "empty_dir").mkdir()
    run = root / "finished"
    threads = torch.get_num_threads()
    try:  # one thread: far faster for this tiny model on a busy machine; restored for the other tests
        code = main(["run", "--out", str(run), *_base(model, data), "--set", "rounds=2", "--set", "model.threads=1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and (run / "results.json").is_file()
    victim = root / "victim"  # an earlier run that a failed `--overwrite` must leave alone
    victim.mkdir()
    (victim / "results.json").write_text('{"summary": "an earlier run"}\n')
    (victim / "adapters").mkdir()
    (victim / "adapters" / "adapter_model.safetensors").write_bytes(b"weights")
    return {"root": root, "model": model, "data": data, "run": run, "victim": victim}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A run's model.threads sets torch's thread count for the whole process: put it back after each case."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _base(model: Path, data: Path) -> list[str]:
    sets = [f"data.path={data}", f"model.name={model}", "clients=3", "global_steps=1", "personal_steps=1",
            "train.batch_size=2", "max_length=64", "global_test_per_label=2", "max_examples_per_client=2",
            "max_global_examples=4", "max_gen_examples=0", "output.plots=false"]
    return [x for s in sets for x in ("--set", s)]


def _fails_cleanly(capsys, argv: list[str], needle: str, watched: Path) -> str:
    before = snapshot(watched)
    code = main(argv)
    cap = capsys.readouterr()
    assert code == 2, (cap.out, cap.err)
    assert cap.err.startswith("error: ") and cap.err.count("\n") == 1, cap.err
    assert needle in cap.err, cap.err
    assert "Traceback" not in cap.out + cap.err
    assert snapshot(watched) == before, "the run directory changed"
    return cap.err


# ----------------------------------------------------------------------------- configs

BAD_CONFIGS = [
    ("seed: -1\n", "seed: -1 must be >= 0"),
    ("federation:\n  aggregation: mode\n", "federation.aggregation: 'mode' is not allowed"),
    ("federation:\n  trim_fraction: 0.5\n", "federation.trim_fraction"),
    ("federation:\n  clip_norm: 0\n", "federation.clip_norm"),
    ("federation:\n  max_norm_ratio: 1\n", "federation.max_norm_ratio"),
    ("federation:\n  server_momentum: 1.0\n", "federation.server_momentum"),
    ("federation:\n  server_optimizer: sgd\n", "federation.server_optimizer"),
    ("output:\n  checkpoint_every: -2\n", "output.checkpoint_every"),
    ("output:\n  save_adapters: maybe\n", "output.save_adapters: expected true or false"),
    ("outptu:\n  dir: x\n", "did you mean 'output'"),
    ("train:\n  lr: .nan\n", "train.lr: expected a finite number"),
    ("train:\n  grad_accum: 2.5\n", "train.grad_accum: expected an integer"),
    ("data:\n  alpha: .inf\n", "data.alpha: expected a finite number"),
    ("method_options:\n  personal_mode: reset\n  share_b_mag: false\n", "needs a global value"),
    ("model:\n  threads: 0\n", "model.threads"),
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("seed: 1\nfederation:\n  rounds: 2\nseed: 2\n", "key 'seed' appears twice (line 4)"),
    ("lora:\n  target_modules: q_proj\n", "lora.target_modules: expected a list"),
    ("eval:\n  split: validation\n", "needs data.validation_fraction"),
    # these get past the config and fail on the data or the model
    ("lora:\n  target_modules: [q_prj]\n", "'q_prj' matches no module of this model (did you mean 'q_proj'?)"),
    ("data:\n  partition: label\n  labels_per_client: 50\n", "labels_per_client=50"),
    ("data:\n  partition: shards\n  shards_per_client: 1000\n", "shards requested"),
]


@pytest.mark.parametrize("text,needle", BAD_CONFIGS)
def test_bad_config(kit, tmp_path, capsys, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    argv = ["run", "--config", str(cfg), "--out", str(kit["victim"]), "--overwrite"]
    if "data" not in text and "lora" not in text:
        argv += _base(kit["model"], kit["data"])
    else:  # the case sets data/lora fields itself; only point at the small files
        argv += ["--set", f"data.path={kit['data']}", "--set", f"model.name={kit['model']}", "--set", "clients=3"]
    _fails_cleanly(capsys, argv, needle, kit["victim"])


def test_binary_config_file(kit, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xff\xfe\x00\x81 not text")
    _fails_cleanly(capsys, ["run", "--config", str(cfg), "--out", str(kit["victim"]), "--overwrite"],
                   "cannot read config file", kit["victim"])


@pytest.mark.parametrize("name,needle", [("missing", "no such directory"), ("empty_dir", "has no config.json")])
def test_bad_model_path_keeps_the_old_run(kit, capsys, name, needle):
    """The model loads before `--overwrite` removes anything (it used to remove the old run first)."""
    argv = ["run", "--out", str(kit["victim"]), "--overwrite", *_base(kit["model"], kit["data"]),
            "--set", f"model.name={kit['root'] / name}"]
    err = _fails_cleanly(capsys, argv, "cannot load tokenizer", kit["victim"])
    assert needle in err and "hub" not in err, err


@pytest.mark.parametrize("config,needle", [("{broken", "config.json is not valid JSON"),
                                           ("{}", "does not hold a loadable model: Unrecognized model")])
def test_a_broken_config_json_is_named(kit, tmp_path, capsys, config, needle):
    """A local model directory whose config.json is broken is reported as such, not as an unreachable hub."""
    model = shutil.copytree(kit["model"], tmp_path / "model")
    (model / "config.json").write_text(config)
    argv = ["run", "--out", str(kit["victim"]), "--overwrite", *_base(kit["model"], kit["data"]),
            "--set", f"model.name={model}"]
    err = _fails_cleanly(capsys, argv, needle, kit["victim"])
    assert str(model) in err and "hub" not in err, err


def test_run_dir_under_a_file(kit, capsys):
    argv = ["run", "--out", str(kit["data"] / "run"), *_base(kit["model"], kit["data"])]
    _fails_cleanly(capsys, argv, "is a file", kit["root"])


def test_force_without_resume(kit, capsys):
    _fails_cleanly(capsys, ["run", "--force", "--out", str(kit["victim"])], "--force only applies to --resume",
                   kit["victim"])


# ----------------------------------------------------------------------------- data files

BAD_DATA = [
    (b"\xff\xfe\x00\x81garbage\n", "cannot read data file"),
    (b"[1, 2, 3]", "expected a list of JSON objects"),
    (b"[]", "the file has no rows"),
    (b'{"rows": [{"instruction": "a", "response": "b"}]}', "field 'instruction' is missing"),
    (b"\n   \n\t\n", "data file is empty"),
    ('{"instruction": "a", "response": "  ", "category": "x"}\n'.encode() * 40, "empty instruction or response"),
    ('{"instruction": "a", "response": "b", "category": {"x": 1}}\n'.encode() * 40, "field 'category' is dict"),
    ('{"instruction": "a", "response": null}\n'.encode() * 40, "field 'response' is NoneType"),
    (b'[1, 2]\n[3]\n', "is not valid JSON"),
    (ROW.encode() * 4, "Dirichlet partition"),
    (ROW.encode() * 2, "federation.clients=3 but only 2 training rows are left after the global test set, so some "
                       "clients would get none: lower federation.clients to at most 2, or use more rows"),
]


@pytest.mark.parametrize("content,needle", BAD_DATA)
def test_bad_data_file(kit, tmp_path, capsys, content, needle):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    argv = ["run", "--out", str(kit["victim"]), "--overwrite", *_base(kit["model"], kit["data"]),
            "--set", f"data.path={p}"]
    _fails_cleanly(capsys, argv, needle, kit["victim"])


def test_field_map_naming_a_missing_field(kit, capsys):
    argv = ["run", "--out", str(kit["victim"]), "--overwrite", *_base(kit["model"], kit["data"]),
            "--set", "data.field_map={instruction: question, response: answer}"]
    _fails_cleanly(capsys, argv, "field 'question' is missing", kit["victim"])


@pytest.mark.parametrize("folder,needle", [("nope", "Natural Instructions folder not found"),
                                           ("empty_dir", "no Natural Instructions task files")])
def test_bad_natural_instructions_folder(kit, capsys, folder, needle):
    argv = ["run", "--out", str(kit["victim"]), "--overwrite", *_base(kit["model"], kit["data"]),
            "--set", "data.source=natural_instructions", "--set", f"data.path={kit['root'] / folder}"]
    _fails_cleanly(capsys, argv, needle, kit["victim"])


# ----------------------------------------------------------------------------- resume misuse


@pytest.fixture
def unfinished(kit, tmp_path):
    """A copy of the finished run without its results: resumable (all rounds done, results to write)."""
    run = tmp_path / "run"
    shutil.copytree(kit["run"], run)
    (run / "results.json").unlink()
    return run


def test_resume_missing_dir(kit, tmp_path, capsys):
    _fails_cleanly(capsys, ["run", "--resume", str(tmp_path / "nope")], "does not exist", tmp_path)


def test_resume_a_file(kit, capsys):
    _fails_cleanly(capsys, ["run", "--resume", str(kit["data"])], "is not a directory", kit["root"])


def test_resume_a_directory_that_is_not_a_run(kit, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    _fails_cleanly(capsys, ["run", "--resume", str(tmp_path)], "is not a run directory", tmp_path)


def test_resume_with_every_checkpoint_torn(unfinished, capsys):
    for manifest in (unfinished / "checkpoints").glob("round-*/manifest.json"):
        manifest.unlink()
    _fails_cleanly(capsys, ["run", "--resume", str(unfinished)], "no complete checkpoint", unfinished)


def test_resume_with_every_checkpoint_corrupt(unfinished, capsys):
    for state in (unfinished / "checkpoints").glob("round-*/state.pt"):
        data = bytearray(state.read_bytes())
        data[-50] ^= 0x01
        state.write_bytes(bytes(data))
    err = _fails_cleanly(capsys, ["run", "--resume", str(unfinished)], "no complete checkpoint", unfinished)
    assert "does not match the manifest" in err


def test_resume_with_changed_set(unfinished, capsys):
    _fails_cleanly(capsys, ["run", "--resume", str(unfinished), "--set", "rounds=5"],
                   "the config differs from the run's (federation.rounds: 2 -> 5)", unfinished)


def test_resume_with_another_config_file(unfinished, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text((unfinished / "config.yaml").read_text().replace("lr: 0.0003", "lr: 0.001"))
    _fails_cleanly(capsys, ["run", "--resume", str(unfinished), "--config", str(other)],
                   "train.lr: 0.0003 -> 0.001", unfinished)


def test_resume_with_changed_data(kit, unfinished, capsys):
    original = kit["data"].read_bytes()
    try:
        kit["data"].write_bytes(original + ROW.encode())
        _fails_cleanly(capsys, ["run", "--resume", str(unfinished)], "the data differ from the run's", unfinished)
    finally:
        kit["data"].write_bytes(original)


@pytest.mark.parametrize("extra,needle", [(["--out", "elsewhere"], "drop --out"),
                                          (["--overwrite"], "contradict")])
def test_resume_with_conflicting_flags(unfinished, capsys, extra, needle):
    _fails_cleanly(capsys, ["run", "--resume", str(unfinished), *extra], needle, unfinished)


@pytest.mark.parametrize("text,needle", [("federation: [\n", "not valid YAML"),
                                         ("federaton:\n  rounds: 2\n", "did you mean 'federation'")])
def test_resume_with_a_broken_run_config(unfinished, capsys, text, needle):
    (unfinished / "config.yaml").write_text(text)
    _fails_cleanly(capsys, ["run", "--resume", str(unfinished)], needle, unfinished)


def test_forced_resume_with_a_checkpoint_that_does_not_fit(unfinished, capsys):
    _fails_cleanly(capsys, ["run", "--resume", str(unfinished), "--force", "--set", "lora.r=4"],
                   "does not fit this config", unfinished)


def test_forced_resume_beyond_the_rounds(unfinished, capsys):
    _fails_cleanly(capsys, ["run", "--resume", str(unfinished), "--force", "--set", "rounds=1"],
                   "beyond federation.rounds=1", unfinished)

