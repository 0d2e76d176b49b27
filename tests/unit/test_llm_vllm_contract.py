"""The vLLM backend's HTTP contract, against a local server answering exactly like vLLM's OpenAI API does."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from flockwatch.common.labels import LabelConfig
from flockwatch.llm_voter.backends import BackendError, VLLMBackend
from flockwatch.llm_voter.model import INVALID, LLMCore
from flockwatch.llm_voter.prompt import Prompt

LABELS = LabelConfig.model_validate(
    {"task": "sms", "labels": [{"name": "ham"}, {"name": "spam", "description": "Unsolicited ads."}]}
)
PROMPT = Prompt.from_labels(LABELS, ["personal", "advert"], "unknown")
BASE = "Qwen/Qwen2.5-7B-Instruct"


def _token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_completion(model: str, answer: str, top: dict[str, float]) -> dict[str, Any]:
    """A /v1/chat/completions body as vLLM returns it with logprobs=true, top_logprobs=k, max_tokens=1."""
    return {
        "id": "chatcmpl-8d3c0f9a1b2c4d5e",
        "object": "chat.completion",
        "created": 1763900000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": {
                    "content": [
                        {
                            **_token(answer, top.get(answer, -0.01)),
                            "top_logprobs": [_token(t, lp) for t, lp in top.items()],
                        }
                    ]
                },
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {"prompt_tokens": 64, "total_tokens": 65, "completion_tokens": 1, "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


class FakeVLLM:
    """Records requests; answers /v1/models, /v1/load_lora_adapter, /tokenize and /v1/chat/completions."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.adapters: dict[str, str] = {}
        self.answers: list[tuple[str, dict[str, float]]] = []
        self.multi_token: set[str] = set()
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/load_lora_adapter")(self.load)
        self.app.post("/tokenize")(self.tokenize)
        self.app.post("/v1/chat/completions")(self.chat)

    async def models(self) -> dict[str, Any]:
        cards = [
            {"id": BASE, "object": "model", "created": 1763900000, "owned_by": "vllm", "root": BASE, "parent": None}
        ]
        cards += [
            {"id": n, "object": "model", "created": 1763900000, "owned_by": "vllm", "root": p, "parent": BASE}
            for n, p in self.adapters.items()
        ]
        return {"object": "list", "data": cards}

    async def load(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(("load", body))
        if body["lora_path"].startswith("/missing"):
            error = {"message": f"No adapter found for {body['lora_path']}", "type": "NotFoundError", "param": None}
            return JSONResponse({"error": {**error, "code": 404}}, status_code=404)
        if body["lora_name"] in self.adapters and not body.get("load_inplace"):
            error = {"message": f"The lora adapter '{body['lora_name']}' has already been loaded.", "param": None}
            return JSONResponse({"error": {**error, "type": "BadRequestError", "code": 400}}, status_code=400)
        self.adapters[body["lora_name"]] = body["lora_path"]
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def tokenize(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        self.requests.append(("tokenize", body))
        count = 2 if body["prompt"] in self.multi_token else 1
        return {"count": count, "max_model_len": 32768, "tokens": list(range(count)), "token_strs": None}

    async def chat(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        self.requests.append(("chat", body))
        answer, top = self.answers.pop(0)
        return chat_completion(body["model"], answer, top)


@pytest.fixture
def vllm() -> Iterator[tuple[FakeVLLM, str]]:
    fake = FakeVLLM()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(5)


def test_adapter_is_loaded_by_name_at_run_time_and_selected_per_request(vllm: tuple[FakeVLLM, str]) -> None:
    fake, url = vllm
    backend = VLLMBackend(PROMPT, url, adapter_name="sms-v1", adapter_path="/models/sms/v1/llm/adapter")
    assert fake.requests[0] == (
        "load",
        {"lora_name": "sms-v1", "lora_path": "/models/sms/v1/llm/adapter", "load_inplace": False},
    )
    assert [b["prompt"] for kind, b in fake.requests if kind == "tokenize"] == ["personal", "advert", "unknown"]
    fake.answers.append(("advert", {"advert": math.log(0.8), "personal": math.log(0.2), "unknown": -9999.0}))
    core = LLMCore(backend, ("ham", "spam"), "v1")
    opinion = core.predict(["WIN a prize! Call 0900"])["llm"][0]
    assert opinion.probabilities == pytest.approx({"ham": 0.2, "spam": 0.8})
    _, chat = fake.requests[-1]
    assert chat["model"] == "sms-v1"
    assert chat["structured_outputs"] == {"choice": ["personal", "advert", "unknown"]}
    assert chat["logprobs"] is True and chat["top_logprobs"] == 3 and chat["max_tokens"] == 1
    assert chat["messages"] == PROMPT.messages("WIN a prize! Call 0900")


def test_a_new_version_of_a_loaded_adapter_is_reloaded_in_place(vllm: tuple[FakeVLLM, str]) -> None:
    fake, url = vllm
    backend = VLLMBackend(PROMPT, url, adapter_name="sms-v1", adapter_path="/models/sms/v1/llm/adapter")
    backend.load_adapter("sms-v1", "/models/sms/v1b/llm/adapter")
    assert fake.requests[-1] == (
        "load",
        {"lora_name": "sms-v1", "lora_path": "/models/sms/v1b/llm/adapter", "load_inplace": True},
    )
    assert fake.adapters == {"sms-v1": "/models/sms/v1b/llm/adapter"}


def test_an_adapter_the_server_refuses_raises_a_clear_error(vllm: tuple[FakeVLLM, str]) -> None:
    _, url = vllm
    with pytest.raises(BackendError, match="refused adapter sms-v2 from /missing/adapter: 404"):
        VLLMBackend(PROMPT, url, adapter_name="sms-v2", adapter_path="/missing/adapter")


def test_an_answer_word_of_several_server_tokens_is_refused(vllm: tuple[FakeVLLM, str]) -> None:
    fake, url = vllm
    fake.multi_token.add("advert")
    with pytest.raises(BackendError, match="'advert' → 2 tokens"):
        VLLMBackend(PROMPT, url)


def test_an_invalid_answer_is_retried_once_then_abstained_on_and_counted(vllm: tuple[FakeVLLM, str]) -> None:
    fake, url = vllm
    backend = VLLMBackend(PROMPT, url)  # no adapter: the base model, first in /v1/models
    fake.answers += [("Sure! The answer", {"Sure": -0.1}), ("maybe", {"maybe": -0.1})]
    core = LLMCore(backend, ("ham", "spam"), "v1")
    opinion = core.predict(["hello"])["llm"][0]
    assert opinion.abstain_reason == INVALID and core.counts.invalid == 1
    assert [b["model"] for kind, b in fake.requests if kind == "chat"] == [BASE, BASE]
