"""LLM backends: transformers + peft in-process (CPU, tests, demo) and a vLLM server over its OpenAI API."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from flockwatch.llm_voter.prompt import Prompt, single_token_ids

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The backend cannot serve: the server refused an adapter, or the answer words do not fit its tokenizer."""


class LLMBackend(Protocol):
    """Scores the answer words for texts (see `flockwatch.llm_voter.model.Scorer`)."""

    prompt: Prompt

    def score(self, texts: Sequence[str]) -> list[list[float] | None]: ...


@contextmanager
def quiet() -> Iterator[None]:
    """transformers/peft warn about things we chose (no hub, generation config); keep them off pytest's error path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_base(base_model: Path, load_in_4bit: bool = False) -> tuple[Any, Any]:
    """The tokenizer (left padding) and the causal LM; 4-bit (bitsandbytes) only when asked and on a CUDA GPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if load_in_4bit and torch.cuda.is_available():
            from transformers import BitsAndBytesConfig

            kwargs = {
                "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
                "device_map": {"": 0},
            }
        model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    return tokenizer, model


def encode(tokenizer: Any, prompt: Prompt, texts: Sequence[str]) -> dict[str, Any]:
    """Chat-templated, left-padded prompts ending where the answer word comes; with RoPE position ids."""
    rendered = [
        tokenizer.apply_chat_template(prompt.messages(t), tokenize=False, add_generation_prompt=True) for t in texts
    ]
    batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = batch["attention_mask"]
    batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(batch)


def next_token_logprobs(model: Any, batch: dict[str, Any], bf16: bool) -> Any:
    """Log-softmax over the vocabulary at the answer position: one forward pass, logits of the last position only."""
    import torch

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(**inputs, logits_to_keep=1).logits[:, -1, :]
    return torch.log_softmax(logits.float(), dim=-1)


class TransformersBackend:
    """transformers + peft in this process: the base model with the LoRA adapter, batched, no gradient."""

    def __init__(
        self, prompt: Prompt, base_model: Path, adapter: Path | None, bf16: bool = True, batch_size: int = 16
    ) -> None:
        import torch

        self.prompt = prompt
        self.bf16 = bf16
        self.batch_size = batch_size
        self.tokenizer, model = load_base(base_model)
        self.word_ids = single_token_ids(self.tokenizer, prompt.all_words)
        if adapter is not None:
            from peft import PeftModel

            with quiet():
                model = PeftModel.from_pretrained(model, adapter)
        self.model = model.eval()
        self._no_grad = torch.inference_mode

    @classmethod
    def from_model(cls, prompt: Prompt, tokenizer: Any, model: Any, bf16: bool = True) -> TransformersBackend:
        """A backend around an already loaded model (used while training)."""
        self = cls.__new__(cls)
        import torch

        self.prompt, self.bf16, self.batch_size = prompt, bf16, 16
        self.tokenizer, self.model = tokenizer, model
        self.word_ids = single_token_ids(tokenizer, prompt.all_words)
        self._no_grad = torch.inference_mode
        return self

    def score(self, texts: Sequence[str]) -> list[list[float] | None]:
        """Full-vocabulary log-probabilities of every answer word, per text."""
        out: list[list[float] | None] = []
        with self._no_grad():
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start : start + self.batch_size]
                logprobs = next_token_logprobs(self.model, encode(self.tokenizer, self.prompt, chunk), self.bf16)
                out += logprobs[:, self.word_ids].tolist()
        return out


class VLLMBackend:
    """A vLLM OpenAI-compatible server: the adapter selected by name, the answer constrained to the words.

    vLLM applies the structured-output grammar mask to the logits *before* it computes log-probabilities (even
    in its default `raw_logprobs` mode), so the top log-probabilities of the first answer token are already
    renormalized over the allowed words: the model's distribution conditioned on answering with one of them.
    That is the quantity the transformers backend computes too; only the mass the model put elsewhere (used
    there to flag invalid outputs) is not observable, so it counts as 1.
    """

    def __init__(
        self,
        prompt: Prompt,
        base_url: str,
        adapter_name: str | None = None,
        adapter_path: str | None = None,
        api_key: str = "EMPTY",
        timeout_s: float = 30.0,
        retries: int = 1,
    ) -> None:
        from openai import OpenAI

        self.prompt = prompt
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=retries)
        self.retries = retries
        self.model = adapter_name or ""
        if adapter_name and adapter_path:
            self.load_adapter(adapter_name, adapter_path)
        if not self.model:
            self.model = self.client.models.list().data[0].id
        self.check_words()

    def load_adapter(self, name: str, path: str) -> None:
        """POST /v1/load_lora_adapter (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=1): the new adapter, no restart."""
        import openai

        loaded = {m.id for m in self.client.models.list().data}
        body = {"lora_name": name, "lora_path": path, "load_inplace": name in loaded}
        try:
            answer = self.client.post("/load_lora_adapter", body=body, cast_to=str)
        except openai.APIStatusError as exc:
            raise BackendError(f"vLLM refused adapter {name} from {path}: {exc.status_code} {exc.message}") from exc
        log.info("vLLM: %s", answer)
        self.model = name

    def check_words(self) -> None:
        """Ask the server's tokenizer (POST /tokenize) that every answer word is one token."""
        root = str(self.client.base_url).rstrip("/").removesuffix("/v1")
        bad = []
        for word in self.prompt.all_words:
            answer: dict[str, Any] = self.client.post(
                f"{root}/tokenize",
                body={"model": self.model, "prompt": word, "add_special_tokens": False},
                cast_to=dict[str, Any],
            )
            if answer.get("count") != 1:
                bad.append(f"{word!r} → {answer.get('count')} tokens")
        if bad:
            raise BackendError(f"answer words are not single tokens for {self.model}: {'; '.join(bad)}")

    def _request(self, text: str) -> Any:
        return self.client.chat.completions.create(
            model=self.model,
            messages=self.prompt.messages(text),
            max_tokens=1,
            temperature=0.0,
            logprobs=True,
            top_logprobs=min(20, len(self.prompt.all_words)),
            extra_body={"structured_outputs": {"choice": list(self.prompt.all_words)}},
        )

    def parse(self, response: Any) -> list[float] | None:
        """Answer-word log-probabilities from a chat completion; None when the answer is not usable."""
        choice = response.choices[0] if response.choices else None
        if choice is None or choice.logprobs is None:
            return None
        content = choice.logprobs.content
        if not content or (choice.message.content or "").strip() not in self.prompt.all_words:
            return None
        top = {t.token.strip(): t.logprob for t in content[0].top_logprobs}
        top.setdefault(content[0].token.strip(), content[0].logprob)
        return [max(top.get(w, -9999.0), -9999.0) for w in self.prompt.all_words]

    def score(self, texts: Sequence[str]) -> list[list[float] | None]:
        """One request per text (vLLM batches concurrent requests itself); an invalid answer is retried once."""
        import openai

        out: list[list[float] | None] = []
        for text in texts:
            result: list[float] | None = None
            for _ in range(1 + self.retries):
                try:
                    result = self.parse(self._request(text))
                except (openai.APIError, ValueError, AttributeError, IndexError) as exc:
                    log.warning("vLLM answer unusable: %s", exc)
                    result = None
                if result is not None:
                    break
            out.append(result)
        return out
