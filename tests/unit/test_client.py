"""The Python client (flockwatch.client) against a scripted transport: typed answers, problems raised as
FlockwatchError, Retry-After honoured on 429/503 and nothing else retried."""

from __future__ import annotations

import json

import httpx
import pytest
from flockwatch.client import AsyncClient, Client, FeedbackAccepted, FlockwatchError

DECISION = {
    "text_id": "t1",
    "prediction": "spam",
    "confidence": 0.99,
    "abstain": False,
    "abstain_reason": None,
    "prediction_set": ["spam"],
    "voter_outputs": {},
    "missing_voters": [],
    "path": "consensus",
    "arbiter_version": "arbiter-1",
    "latency_ms": 3.0,
}


def problem(status: int, detail: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    body = {"type": "about:blank", "title": "x", "status": status, "detail": detail}
    return httpx.Response(status, json=body, headers={**headers, "content-type": "application/problem+json"})


def scripted(*answers: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return httpx.MockTransport(handle), seen


def test_predict_is_typed_and_sends_the_token_and_the_text() -> None:
    transport, seen = scripted(httpx.Response(200, json=DECISION))
    with Client("http://gw", token="fw_x", transport=transport) as fw:
        decision = fw.predict("WIN now", text_id="t1", metadata={"source": "sms"})
    assert decision.prediction == "spam" and decision.prediction_set == ["spam"]
    assert seen[0].headers["authorization"] == "Bearer fw_x" and seen[0].url.path == "/predict"
    assert json.loads(seen[0].content) == {"text": "WIN now", "text_id": "t1", "metadata": {"source": "sms"}}


def test_a_refusal_is_raised_with_the_problems_detail_and_not_retried() -> None:
    transport, seen = scripted(problem(422, "text: String should have at least 1 character"))
    with Client("http://gw", transport=transport) as fw, pytest.raises(FlockwatchError) as err:
        fw.predict("")
    assert err.value.status == 422 and "at least 1 character" in err.value.detail and len(seen) == 1


def test_429_and_503_with_retry_after_are_retried_after_the_seconds_asked() -> None:
    transport, seen = scripted(
        problem(503, "shed", "0"), problem(429, "over the limit", "0"), httpx.Response(200, json=DECISION)
    )
    with Client("http://gw", transport=transport) as fw:
        assert fw.predict("hi").prediction == "spam"
    assert len(seen) == 3
    # without Retry-After, or beyond the retries: the error
    transport, seen = scripted(problem(503, "no retry-after"))
    with Client("http://gw", transport=transport) as fw, pytest.raises(FlockwatchError):
        fw.predict("hi")
    transport, seen = scripted(*[problem(503, "shed", "0")] * 3)
    with Client("http://gw", transport=transport, retries=2) as fw, pytest.raises(FlockwatchError) as err:
        fw.predict("hi")
    assert len(seen) == 3 and err.value.retryable


async def test_the_async_client_reads_decisions_and_sends_feedback_to_the_feedback_url() -> None:
    answers = (
        problem(404, "no decision for text 'a/b' (yet)"),
        httpx.Response(202, json={"feedback_id": "f1", "status": "stored", "duplicate": False}),
    )
    transport, seen = scripted(*answers)
    async with AsyncClient("http://gw", feedback_url="http://fb", transport=transport) as fw:
        assert await fw.decision("a/b") is None
        accepted = await fw.feedback("t1", reviewer_id="alice", label="spam")
    assert seen[0].url.raw_path == b"/decisions/a%2Fb"
    assert isinstance(accepted, FeedbackAccepted) and accepted.status == "stored"
    assert seen[1].url.host == "fb" and json.loads(seen[1].content) == {
        "text_id": "t1",
        "reviewer_id": "alice",
        "label": "spam",
    }
