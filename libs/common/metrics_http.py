"""Prometheus metrics over HTTP: request counts and latency for the HTTP APIs, and a metrics port for the
services that only talk to the bus (voters, arbiter)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

from flockwatch.common import telemetry, tracing
from flockwatch.common.settings import CommonSettings
from opentelemetry import context as otel_context
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from starlette.responses import Response

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class HttpTelemetry:
    """ASGI middleware: counts and times each request by route template (`/decisions/{text_id}`, not the
    raw path, so the series stay few); with tracing on, a client's `traceparent` becomes the parent context."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.name = name
        # each series' children, looked up once: `labels()` takes a lock and builds its key on every call (a
        # twentieth of the gateway's CPU per request); route templates, methods and statuses are few
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = None
        if tracing.ENABLED:
            remote = tracing.extract({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
            token = otel_context.attach(remote) if remote is not None else None
        try:
            await self.app(scope, receive, sending)
        finally:
            if token is not None:
                otel_context.detach(token)
            route = scope.get("route")  # set by the router once a route matched
            path = getattr(route, "path", None) or "unmatched"
            key = (scope["method"], path, status)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = (
                    telemetry.HTTP_REQUESTS.labels(self.name, scope["method"], path, str(status)),
                    telemetry.HTTP_SECONDS.labels(self.name, path),
                )
            series[0].inc()
            series[1].observe(time.perf_counter() - start)


def metrics_response() -> Response:
    """The process's Prometheus metrics, for an HTTP service's `GET /metrics`."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def serve_metrics(settings: CommonSettings) -> tuple[WSGIServer, Thread] | None:
    """Serve /metrics on `settings.metrics_port` in a thread (None when unset); returns the server to shut down."""
    if settings.metrics_port is None:
        return None
    server, thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.server_port)
    return server, thread
