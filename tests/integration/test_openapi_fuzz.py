"""Schemathesis against the OpenAPI documents of the gateway (embedded, every cheap voter running) and of the
feedback service (on the real Postgres), both served over real HTTP by uvicorn in a loop of their own: whatever a
client sends, valid or not, no answer is a 5xx, every refusal is a 4xx whose `detail` says what was wrong, and
every answer has a documented status code and matches its response schema. Auth is off (no token file): the
routes themselves are fuzzed, not the bearer check."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
import uvicorn
from flockwatch.cli.runtime import ALL, build
from flockwatch.common.bus import create_bus
from flockwatch.common.http import EmbeddedServer
from flockwatch.feedback.api import create_app as feedback_api
from flockwatch.feedback.app import FeedbackService
from flockwatch.gateway.app import create_app as gateway_api
from flockwatch.gateway.settings import GatewaySettings
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.feedback_support import fresh_schema, settings_for

T = TypeVar("T")
# a few generated requests per operation; schemathesis' coverage phase adds its boundary and negative cases
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]

# The documents, from apps that are built but never started (pytest 9 cannot run schemathesis' lazy loaders)
GATEWAY = schemathesis.openapi.from_dict(gateway_api(GatewaySettings(_env_file=None)).openapi())
_idle = settings_for("openapi_only")
FEEDBACK = schemathesis.openapi.from_dict(feedback_api(FeedbackService(create_bus(_idle), _idle)).openapi())


class LoopThread:
    """An event loop in a thread of its own: the served app lives there, the sync fuzzing test calls over HTTP."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-app", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def gateway_url(sms_bundle: Path) -> Iterator[str]:
    """The embedded stack behind uvicorn (lifespan on: it starts the bus, the voters and the arbiter)."""
    gateway_settings = GatewaySettings(
        _env_file=None, bus_url="memory://", model_dir=sms_bundle, arbiter_deadline_ms=200, gateway_cache=False
    )
    bus, services = build(ALL, gateway_settings)
    app = gateway_api(gateway_settings, bus, services)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", access_log=False)
    server = EmbeddedServer(config)
    thread = LoopThread()
    port = thread.run(server.start("gateway"))
    yield f"http://127.0.0.1:{port}"
    thread.run(server.stop())
    thread.close()


@pytest.fixture(scope="module")
def feedback_url() -> Iterator[str]:
    """The feedback service on a fresh Postgres schema, serving its own HTTP API on a free port."""
    thread = LoopThread()
    schemas = fresh_schema()
    schema = thread.run(schemas.__aenter__())
    service_settings = settings_for(schema, feedback_serve_http=True, feedback_port=0)
    service = FeedbackService(create_bus(service_settings), service_settings)
    thread.run(service.start())
    thread.run(service.bus.start())
    yield f"http://127.0.0.1:{service.http_port}"
    thread.run(service.bus.stop())
    thread.run(service.stop())
    thread.run(schemas.__aexit__(None, None, None))  # drops the schema
    thread.close()


def assert_clear(response: Any) -> None:
    """Not a server error; a refusal says why in `detail`."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        detail = response.json().get("detail")
        assert detail and isinstance(detail, str), response.text[:500]


@GATEWAY.parametrize()
@FUZZ
def test_the_gateway_answers_any_request_without_a_server_error(case: Any, gateway_url: str) -> None:
    assert_clear(case.call_and_validate(base_url=gateway_url, checks=CHECKS))


@FEEDBACK.parametrize()
@FUZZ
def test_the_feedback_api_answers_any_request_without_a_server_error(case: Any, feedback_url: str) -> None:
    assert_clear(case.call_and_validate(base_url=feedback_url, checks=CHECKS))
