"""A typed Python client for Flockwatch's HTTP APIs: the gateway (predict, predict_batch, submit, decision) and
the feedback service (feedback). `Client` blocks, `AsyncClient` awaits; both return the APIs' own pydantic
models and raise `FlockwatchError` (the RFC 9457 problem the API answered) on a refusal.

A refusal that says when to come back — 429 (rate limit, the tenant's texts in flight) and 503 (load shed, the
bus unavailable), each with `Retry-After` — is retried up to `retries` times after the seconds it asks for
(at most `max_wait_s` each; tenacity). Resending is safe: a `text_id` names one text, so the gateway
answers a resent text once, and a `feedback_id` stores a correction once.

    from flockwatch.client import Client

    with Client("http://127.0.0.1:8000", token="fw_…", feedback_url="http://127.0.0.1:8010") as fw:
        decision = fw.predict("WINNER!! claim your prize", text_id="msg-1")
        if decision.abstain:
            fw.feedback("msg-1", label="spam", reviewer_id="alice")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx
from flockwatch.common.events import Decision
from flockwatch.gateway.schemas import Accepted, PredictBatchResponse, PredictResponse
from pydantic import BaseModel
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt

__all__ = ["Accepted", "AsyncClient", "Client", "Decision", "FeedbackAccepted", "FlockwatchError", "PredictResponse"]

RETRYABLE = (429, 503)


class FeedbackAccepted(BaseModel):
    """Where the feedback is: stored in Postgres, or queued on the bus (Postgres unreachable)."""

    feedback_id: str
    status: Literal["stored", "queued"]
    duplicate: bool


class FlockwatchError(Exception):
    """An API refused a request: its status, and the problem it answered (RFC 9457)."""

    def __init__(self, status: int, title: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """The API asked to come back later (429 or 503 with Retry-After)."""
        return self.status in RETRYABLE and self.retry_after is not None

    @classmethod
    def of(cls, response: httpx.Response) -> FlockwatchError:
        """The error of a refused response (a problem document, or whatever text came back)."""
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        retry = response.headers.get("retry-after")
        return cls(
            response.status_code,
            str(body.get("title") or response.reason_phrase),
            str(body.get("detail") or response.text[:500]),
            float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
        )


@dataclass(frozen=True)
class _Call:
    """One request, where it goes, and how its answer is read."""

    api: Literal["gateway", "feedback"]
    method: str
    path: str
    body: Any
    read: Callable[[httpx.Response], Any]
    none_if: int | None = None  # this refusal means "there is none (yet)": the answer is None, not an error


def _model(model: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: model.model_validate_json(response.content)


def _text(text: str, text_id: str | None, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"text": text}
    if text_id is not None:
        body["text_id"] = text_id
    if metadata:
        body["metadata"] = dict(metadata)
    return body


def _predict(text: str, text_id: str | None, metadata: Mapping[str, str] | None) -> _Call:
    return _Call("gateway", "POST", "/predict", _text(text, text_id, metadata), _model(PredictResponse))


def _predict_batch(texts: Sequence[str | Mapping[str, Any]]) -> _Call:
    items = [{"text": t} if isinstance(t, str) else dict(t) for t in texts]
    return _Call("gateway", "POST", "/predict/batch", {"texts": items}, _model(PredictBatchResponse))


def _submit(text: str, text_id: str | None, metadata: Mapping[str, str] | None) -> _Call:
    return _Call("gateway", "POST", "/texts", _text(text, text_id, metadata), _model(Accepted))


def _decision(text_id: str) -> _Call:
    return _Call("gateway", "GET", f"/decisions/{quote(text_id, safe='')}", None, _model(Decision), none_if=404)


def _feedback(text_id: str, reviewer_id: str, label: str | None, thumbs: str | None, **more: str | None) -> _Call:
    body = {"text_id": text_id, "reviewer_id": reviewer_id, "label": label, "thumbs": thumbs, **more}
    return _Call(
        "feedback", "POST", "/feedback", {k: v for k, v in body.items() if v is not None}, _model(FeedbackAccepted)
    )


def _wait(max_wait_s: float) -> Callable[[RetryCallState], float]:
    def seconds(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = exc.retry_after if isinstance(exc, FlockwatchError) and exc.retry_after is not None else 1.0
        return min(max(asked, 0.0), max_wait_s)

    return seconds


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, FlockwatchError) and exc.retryable


class _Base:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        feedback_url: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        max_wait_s: float = 10.0,
        transport: Any = None,
    ) -> None:
        self.urls = {"gateway": url.rstrip("/"), "feedback": (feedback_url or url).rstrip("/")}
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.transport = transport  # an httpx transport (tests: httpx.MockTransport, httpx.ASGITransport)
        self.retry: dict[str, Any] = {  # tenacity's Retrying / AsyncRetrying arguments
            "retry": retry_if_exception(_retryable),
            "stop": stop_after_attempt(retries + 1),
            "wait": _wait(max_wait_s),
            "reraise": True,
        }

    def _url(self, call: _Call) -> str:
        return self.urls[call.api] + call.path

    @staticmethod
    def _read(call: _Call, response: httpx.Response) -> Any:
        if response.is_success:
            return call.read(response)
        if response.status_code == call.none_if:
            return None
        raise FlockwatchError.of(response)


class Client(_Base):
    """The blocking client (one connection pool; use it as a context manager, or `close()` it)."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.http = httpx.Client(headers=self.headers, timeout=self.timeout, transport=self.transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def _send(self, call: _Call) -> Any:
        for attempt in Retrying(**self.retry):
            with attempt:
                response = self.http.request(call.method, self._url(call), json=call.body)
                return self._read(call, response)
        raise AssertionError("unreachable")  # pragma: no cover - tenacity reraises

    def predict(
        self, text: str, *, text_id: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> PredictResponse:
        """Classify a text and wait for its decision."""
        return self._send(_predict(text, text_id, metadata))

    def predict_batch(self, texts: Sequence[str | Mapping[str, Any]]) -> PredictBatchResponse:
        """Classify up to 1,000 texts at once (strings, or {"text", "text_id", "metadata"} items)."""
        return self._send(_predict_batch(texts))

    def submit(self, text: str, *, text_id: str | None = None, metadata: Mapping[str, str] | None = None) -> Accepted:
        """Hand a text in for classification; its decision comes later (`decision`, or the bus)."""
        return self._send(_submit(text, text_id, metadata))

    def decision(self, text_id: str) -> Decision | None:
        """The full decision record of one of the caller's texts; None while there is none (yet)."""
        return self._send(_decision(text_id))

    def feedback(
        self,
        text_id: str,
        *,
        reviewer_id: str,
        label: str | None = None,
        thumbs: Literal["up", "down"] | None = None,
        note: str | None = None,
        feedback_id: str | None = None,
    ) -> FeedbackAccepted:
        """A correction (the true label) and/or a thumbs up/down for a decided text."""
        call = _feedback(text_id, reviewer_id, label, thumbs, note=note, feedback_id=feedback_id)
        return self._send(call)


class AsyncClient(_Base):
    """The asyncio client (one connection pool; use it as an async context manager, or `aclose()` it)."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.http = httpx.AsyncClient(headers=self.headers, timeout=self.timeout, transport=self.transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    async def _send(self, call: _Call) -> Any:
        async for attempt in AsyncRetrying(**self.retry):
            with attempt:
                response = await self.http.request(call.method, self._url(call), json=call.body)
                return self._read(call, response)
        raise AssertionError("unreachable")  # pragma: no cover - tenacity reraises

    async def predict(
        self, text: str, *, text_id: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> PredictResponse:
        """Classify a text and wait for its decision."""
        return await self._send(_predict(text, text_id, metadata))

    async def predict_batch(self, texts: Sequence[str | Mapping[str, Any]]) -> PredictBatchResponse:
        """Classify up to 1,000 texts at once (strings, or {"text", "text_id", "metadata"} items)."""
        return await self._send(_predict_batch(texts))

    async def submit(
        self, text: str, *, text_id: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> Accepted:
        """Hand a text in for classification; its decision comes later (`decision`, or the bus)."""
        return await self._send(_submit(text, text_id, metadata))

    async def decision(self, text_id: str) -> Decision | None:
        """The full decision record of one of the caller's texts; None while there is none (yet)."""
        return await self._send(_decision(text_id))

    async def feedback(
        self,
        text_id: str,
        *,
        reviewer_id: str,
        label: str | None = None,
        thumbs: Literal["up", "down"] | None = None,
        note: str | None = None,
        feedback_id: str | None = None,
    ) -> FeedbackAccepted:
        """A correction (the true label) and/or a thumbs up/down for a decided text."""
        call = _feedback(text_id, reviewer_id, label, thumbs, note=note, feedback_id=feedback_id)
        return await self._send(call)
