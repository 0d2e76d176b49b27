"""Refuse new texts before FastAPI reads or routes the request while the gateway is over its limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flockwatch.common import telemetry
from flockwatch.common.problems import PROBLEM_JSON, problem_body

Scope = dict[str, Any]
TEXT_PATHS = frozenset({"/predict", "/predict/batch", "/texts"})


class ShedLoad:
    """An ASGI middleware: a POST of new texts while `overloaded()` gives a reason is answered 503 with
    Retry-After at once, its body unread. A refusal must cost far less than an answer; refused inside the
    endpoint (body parsed, validated, authorized), overload would only move from the pipeline into the HTTP
    layer, and the accepted texts would queue there. The endpoint still checks exactly (a batch's size)."""

    def __init__(self, app: Any, overloaded: Callable[[int], str | None]) -> None:
        self.app = app
        self.overloaded = overloaded

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in TEXT_PATHS:
            why = self.overloaded(1)
            if why is not None:
                telemetry.REFUSED.inc()
                await _refuse(send, why)
                return
        await self.app(scope, receive, send)


async def _refuse(send: Any, why: str) -> None:
    body = problem_body(503, f"{why}; retry after the Retry-After seconds")
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"keep-alive"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
