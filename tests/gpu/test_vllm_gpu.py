"""Real vLLM on a GPU: start the server with LoRA enabled, load an adapter at run time, one constrained request.

Skipped (with the reason) unless a CUDA GPU and the `vllm` package are present. The base model is
FLOCKWATCH_LLM_GPU_BASE (a local folder) or the converted SmolLM2 from `flockwatch llm setup`.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = Path(os.environ.get("FLOCKWATCH_LLM_GPU_BASE", ROOT / "models" / "base" / "smollm2-135m-instruct"))


def _gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (it runs as its own server, in its own environment)"
    if not (BASE / "config.json").exists():
        return f"no base model at {BASE} (run `flockwatch llm setup` or set FLOCKWATCH_LLM_GPU_BASE)"
    return None


REASON = _gpu_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained LoRA adapter (r=16 on q/k/v/o) in peft's format: what train_lora writes."""
    from flockwatch.llm_voter.backends import load_base, quiet
    from peft import LoraConfig, get_peft_model

    _, model = load_base(BASE)
    out = tmp_path_factory.mktemp("adapter")
    with quiet():
        peft_model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
        peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(BASE),
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--max-model-len",
        "2048",
        "--gpu-memory-utilization",
        "0.5",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(60)


def test_adapter_loads_at_run_time_and_answers_one_constrained_request(server: str, adapter: Path) -> None:
    from flockwatch.common.labels import LabelConfig
    from flockwatch.llm_voter.backends import VLLMBackend
    from flockwatch.llm_voter.model import LLMCore
    from flockwatch.llm_voter.prompt import Prompt

    labels = LabelConfig.load(ROOT / "configs" / "sms" / "labels.yaml")
    prompt = Prompt.from_labels(labels, ["personal", "advert"], "unknown")
    backend = VLLMBackend(prompt, server, adapter_name="sms-gpu-test", adapter_path=str(adapter))
    core = LLMCore(backend, tuple(labels.names), "gpu-test", min_label_mass=0.0)
    opinion = core.predict(["WINNER! Claim your prize now, call 09061"])["llm"][0]
    assert core.counts.invalid == 0
    if not opinion.abstains:
        assert sum((opinion.probabilities or {}).values()) == pytest.approx(1.0)
