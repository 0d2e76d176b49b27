"""`flockwatch train-lora`: a peft LoRA adapter that answers one word per class, early-stopped on validation ECE."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flockwatch.common.labels import LabelConfig
from flockwatch.common.metrics import classification_report
from flockwatch.llm_voter.backends import TransformersBackend, encode, load_base, next_token_logprobs, quiet
from flockwatch.llm_voter.config import LoraConfig
from flockwatch.llm_voter.model import LLMCore, fit_temperature
from flockwatch.llm_voter.prompt import Prompt, single_token_ids

LLM_JSON = "llm.json"
ADAPTER_DIR = "adapter"
CONTENTLESS = ("...", "?", "ok", "hmm", "asdf", "lorem ipsum", "123", ":)", "test", "null")


@dataclass
class LoraResult:
    """What a training run produced: timings, the validation ECE history, the temperature, invalid outputs."""

    out_dir: Path
    train_seconds: float
    total_seconds: float
    steps: int
    best_step: int
    n_train: int
    n_abstain_examples: int
    temperature: float
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: dict[str, Any] = field(default_factory=dict)
    invalid_outputs: dict[str, int] = field(default_factory=dict)


def stratified_cap(texts: Sequence[str], labels: Sequence[str], cap: int | None, seed: int) -> list[int]:
    """Indices of at most `cap` examples keeping the class proportions (every class keeps at least one)."""
    idx = list(range(len(texts)))
    if cap is None or cap >= len(idx):
        return idx
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i in idx:
        by_class.setdefault(labels[i], []).append(i)
    chosen: list[int] = []
    for members in by_class.values():
        rng.shuffle(members)
        chosen += members[: max(1, round(cap * len(members) / len(idx)))]
    return sorted(chosen)


def abstain_examples(texts: Sequence[str], n: int, seed: int) -> list[str]:
    """Texts nobody can classify: shuffled characters of real texts, random letters, contentless snippets."""
    rng = random.Random(seed + 1)
    out: list[str] = []
    for i in range(n):
        kind = i % 3
        if kind == 0 and texts:
            chars = list(rng.choice(texts).replace(" ", ""))
            rng.shuffle(chars)
            out.append("".join(chars[: rng.randint(8, 60)]) or "xq")
        elif kind == 1:
            out.append(" ".join("".join(rng.choices("bcdfghjklmnpqrstvwxz", k=rng.randint(2, 7))) for _ in range(4)))
        else:
            out.append(rng.choice(CONTENTLESS))
    return out


def build_prompt(labels: LabelConfig, config: LoraConfig) -> Prompt:
    """The prompt for the task, with its answer words from the config."""
    words = config.words_for(labels.task, labels.names)
    return Prompt.from_labels(labels, words, config.abstain_word, config.max_text_chars)


def evaluate(core: LLMCore, texts: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Macro-F1, ECE (rows the model answered), coverage and invalid-output counts on labelled texts."""
    before = core.counts.as_dict()
    probs, _ = core.class_probabilities(texts)
    report = classification_report(list(labels), probs, list(core.names))
    after = core.counts.as_dict()
    counts = {k: after[k] - before[k] for k in after}
    keys = ("n", "n_scored", "accuracy", "macro_f1", "ece", "brier")
    return {**{k: report[k] for k in keys}, "coverage": report["n_scored"] / max(report["n"], 1), **counts}


def _logits(core: LLMCore, texts: Sequence[str]) -> np.ndarray:
    scores = core.scorer.score(list(texts))
    k = len(core.names)
    return np.array([s[:k] if s is not None else [0.0] * k for s in scores], dtype=np.float64)


def train_lora(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    val_texts: Sequence[str],
    val_labels: Sequence[str],
    labels: LabelConfig,
    config: LoraConfig,
    base_model: Path,
    out_dir: Path,
    progress: Callable[[str], None] = lambda _: None,
) -> LoraResult:
    """Train a LoRA adapter, keep the best validation checkpoint (`_Checkpoints`), fit a temperature, save it."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    prompt = build_prompt(labels, config)
    progress("loading the base model")
    tokenizer, base = load_base(base_model, config.load_in_4bit)
    word_ids = single_token_ids(tokenizer, prompt.all_words)
    keep = stratified_cap(train_texts, train_labels, config.max_train, config.seed)
    examples = [(train_texts[i], word_ids[labels.names.index(train_labels[i])]) for i in keep]
    n_abstain = round(config.abstain_fraction * len(examples) / (1 - config.abstain_fraction))
    examples += [(t, word_ids[-1]) for t in abstain_examples([e[0] for e in examples], n_abstain, config.seed)]
    es = config.early_stopping
    val_t, val_y = list(val_texts[: es.val_max]), list(val_labels[: es.val_max])
    rest = len(val_texts) - len(val_t)
    temp_t, temp_y = (
        (
            list(val_texts[es.val_max :][: config.temperature_max]),
            list(val_labels[es.val_max :][: config.temperature_max]),
        )
        if rest >= 32
        else (list(val_texts[: config.temperature_max]), list(val_labels[: config.temperature_max]))
    )

    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    with quiet():
        model = get_peft_model(base, peft_config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    per_epoch = max(1, -(-len(examples) // config.batch_size))
    total = config.max_steps or max(1, round(config.epochs * per_epoch))
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    backend = TransformersBackend.from_model(prompt, tokenizer, model, config.bf16)
    core = LLMCore(backend, tuple(labels.names), "training", 1.0, config.min_label_mass)

    history: list[dict[str, Any]] = []
    checkpoints = _Checkpoints(es.f1_tolerance, es.min_delta)
    stale, step, rng = 0, 0, random.Random(config.seed)

    def checkpoint() -> bool:
        nonlocal stale
        model.eval()
        metrics = evaluate(core, val_t, val_y)
        model.train()
        ece = metrics["ece"] if metrics["ece"] is not None else 1.0
        f1 = metrics["macro_f1"] or 0.0
        history.append({"step": step, "seconds": round(time.perf_counter() - started, 1), **metrics})
        progress(f"step {step}/{total}: val ECE {ece:.4f} macro-F1 {f1:.3f} invalid {metrics['invalid']}")
        improved = checkpoints.add(step, f1, ece, _copy(get_peft_model_state_dict(model)))
        stale = 0 if improved else stale + 1
        return stale >= es.patience

    train_started = time.perf_counter()
    model.train()
    stop = False
    while step < total and not stop:
        rng.shuffle(examples)
        for start in range(0, len(examples), config.batch_size):
            batch = examples[start : start + config.batch_size]
            logprobs = next_token_logprobs(model, encode(tokenizer, prompt, [t for t, _ in batch]), config.bf16)
            loss = torch.nn.functional.nll_loss(logprobs, torch.tensor([y for _, y in batch], device=logprobs.device))
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:
                progress(f"step {step}/{total}: loss {loss.item():.4f}")
            if step % es.eval_every == 0 or step == total:
                stop = checkpoint()
            if stop or step >= total:
                break
    if not history or history[-1]["step"] != step:
        checkpoint()
    train_seconds = time.perf_counter() - train_started
    best = checkpoints.best
    set_peft_model_state_dict(model, best.state)
    model.eval()

    progress("fitting the temperature")
    y_temp = [labels.names.index(y) for y in temp_y]
    core.temperature = fit_temperature(_logits(core, temp_t), y_temp)
    core.counts.invalid = core.counts.unsure = core.counts.scored = 0
    val_metrics = evaluate(core, val_t, val_y)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet():
        model.save_pretrained(str(out_dir / ADAPTER_DIR))
    result = LoraResult(
        out_dir=out_dir,
        train_seconds=round(train_seconds, 1),
        total_seconds=round(time.perf_counter() - started, 1),
        steps=step,
        best_step=best.step,
        n_train=len(keep),
        n_abstain_examples=n_abstain,
        temperature=core.temperature,
        history=history,
        val_metrics=val_metrics,
        invalid_outputs=core.counts.as_dict(),
    )
    _write_llm_json(out_dir, prompt, config, base_model, result)
    return result


@dataclass
class _Checkpoint:
    step: int
    f1: float
    ece: float
    state: dict[str, Any]


@dataclass
class _Checkpoints:
    """Every validation checkpoint (LoRA states are small); the best is the lowest-ECE one among those whose
    macro-F1 is within `f1_tolerance` of the best F1 of all checkpoints, judged again after each one.

    A low ECE alone is no skill (a prior-matching predictor is calibrated), and the temperature fitted
    afterwards repairs much of the calibration, so a checkpoint far behind on F1 never wins on ECE.
    """

    f1_tolerance: float
    min_delta: float
    seen: list[_Checkpoint] = field(default_factory=list)

    @property
    def best(self) -> _Checkpoint:
        top = max(c.f1 for c in self.seen)
        eligible = [c for c in self.seen if c.f1 >= top - self.f1_tolerance]
        lowest = min(c.ece for c in eligible)
        # within min_delta of the lowest ECE, prefer the better F1
        return max((c for c in eligible if c.ece <= lowest + self.min_delta), key=lambda c: c.f1)

    def add(self, step: int, f1: float, ece: float, state: dict[str, Any]) -> bool:
        """Record a checkpoint; True when it is the new best (training goes on)."""
        before = self.best if self.seen else None
        self.seen.append(_Checkpoint(step, f1, ece, state))
        return self.best is not before


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in state.items()}


def _write_llm_json(out_dir: Path, prompt: Prompt, config: LoraConfig, base_model: Path, result: LoraResult) -> None:
    info = {
        "prompt": prompt.to_json(),
        "temperature": result.temperature,
        "min_label_mass": config.min_label_mass,
        "bf16": config.bf16,
        "base_model": {"name": Path(base_model).name, "path": str(base_model)},
        "adapter": ADAPTER_DIR,
        "lora": config.model_dump(),
        "metrics": {"validation": result.val_metrics, "history": result.history},
        "training": {k: v for k, v in asdict(result).items() if k not in ("history", "val_metrics", "out_dir")},
    }
    (out_dir / LLM_JSON).write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
