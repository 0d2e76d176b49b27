"""Schemathesis, every check (`--checks all`), against the OpenAPI documents of the gateway (embedded, every cheap
voter running), the feedback service and the trainer (each on a fresh Postgres schema), all served over real HTTP
by uvicorn in a loop of their own: whatever a client sends, valid or not, no answer is a 5xx, every refusal is a
4xx whose `detail` says what was wrong, every answer has a documented status code, content type, headers and
schema, invalid input is refused and valid input accepted, and a route that needs a token refuses a request
without one. Auth is on: the fuzzer calls with an admin token; schemathesis itself probes without it."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
import uvicorn
import yaml
from flockwatch.cli.runtime import ALL, build
from flockwatch.common.artifacts import read_manifest
from flockwatch.common.bus import create_bus
from flockwatch.common.http import EmbeddedServer
from flockwatch.common.tokens import hash_token, new_token
from flockwatch.feedback.api import create_app as feedback_api
from flockwatch.feedback.app import FeedbackService
from flockwatch.feedback.config import load_task
from flockwatch.gateway.app import create_app as gateway_api
from flockwatch.gateway.settings import GatewaySettings
from flockwatch.trainer.api import create_app as trainer_api
from flockwatch.trainer.app import TrainerService
from flockwatch.trainer.settings import TrainerSettings
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig

from tests.integration.feedback_support import DSN, fresh_schema, settings_for

T = TypeVar("T")
# a few generated requests per operation; schemathesis' coverage phase adds its boundary and negative cases
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
load_all_checks()
ALL_CHECKS = CHECKS.get_all()  # what `schemathesis run --checks all` runs

# an admin token (every scope), given to schemathesis as the documents' bearer scheme: it sends it, and knows
# that a case it generates without it (or with another) must be refused
TOKEN = new_token()
AUTH = SchemathesisConfig.from_dict({"auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}}})


def document(app: Any) -> Any:
    """The schemathesis schema of an app built but never started (pytest 9 cannot run its lazy loaders)."""
    return schemathesis.openapi.from_dict(app.openapi(), config=AUTH)


GATEWAY = document(gateway_api(GatewaySettings(_env_file=None)))
_idle = settings_for("openapi_only")
_feedback = FeedbackService(create_bus(_idle), _idle)
_feedback.task = load_task(_idle.feedback_labels, _idle.feedback_rules, None)  # as `start` loads it: the labels
FEEDBACK = document(feedback_api(_feedback))
_trainer_idle = TrainerSettings(_env_file=None, bus_url="memory://")
TRAINER = document(trainer_api(TrainerService(create_bus(_trainer_idle), _trainer_idle)))


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


class IdleTrainer(TrainerService):
    """A trainer whose worker never starts a queued run: its API is fuzzed, not training (runs stay queued)."""

    async def _worker(self) -> None:
        await asyncio.Event().wait()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The token file the APIs check: TOKEN, with every scope."""
    path = tmp_path_factory.mktemp("tokens") / "tokens.yaml"
    path.write_text(yaml.safe_dump([{"name": "fuzzer", "sha256": hash_token(TOKEN), "scopes": ["admin"]}]))
    return path


@pytest.fixture(scope="module")
def gateway_url(sms_bundle: Path, tokens: Path) -> Iterator[str]:
    """The embedded stack behind uvicorn (lifespan on: it starts the bus, the voters and the arbiter)."""
    gateway_settings = GatewaySettings(
        _env_file=None,
        bus_url="memory://",
        model_dir=sms_bundle,
        arbiter_deadline_ms=200,
        gateway_cache=False,
        auth_tokens_file=tokens,
        rate_limit=None,
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
def feedback_url(tokens: Path) -> Iterator[str]:
    """The feedback service on a fresh Postgres schema, serving its own HTTP API on a free port."""
    thread = LoopThread()
    schemas = fresh_schema()
    schema = thread.run(schemas.__aenter__())
    service_settings = settings_for(
        schema, feedback_serve_http=True, feedback_port=0, auth_tokens_file=tokens, rate_limit=None
    )
    service = FeedbackService(create_bus(service_settings), service_settings)
    thread.run(service.start())
    thread.run(service.bus.start())
    yield f"http://127.0.0.1:{service.http_port}"
    thread.run(service.bus.stop())
    thread.run(service.stop())
    thread.run(schemas.__aexit__(None, None, None))  # drops the schema
    thread.close()


@pytest.fixture(scope="module")
def trainer_url(sms_bundle: Path, tmp_path_factory: pytest.TempPathFactory, tokens: Path) -> Iterator[str]:
    """A trainer on fresh Postgres schemas with a model root of one version (the SMS bundle), serving HTTP."""
    root = tmp_path_factory.mktemp("trainer-models") / "sms"
    version = read_manifest(sms_bundle, verify=False).version
    shutil.copytree(sms_bundle, root / version)
    (root / "current").symlink_to(version)
    thread = LoopThread()
    runs, feedback = fresh_schema(), fresh_schema()
    runs_schema, feedback_schema = thread.run(runs.__aenter__()), thread.run(feedback.__aenter__())
    trainer_settings = TrainerSettings(
        _env_file=None,
        bus_url="memory://",
        model_dir=root / "current",
        trainer_database_url=DSN,
        trainer_db_schema=runs_schema,
        trainer_feedback_schema=feedback_schema,
        trainer_port=0,
        trainer_check_interval_s=3600,
        auth_tokens_file=tokens,
        rate_limit=None,
    )
    service = IdleTrainer(create_bus(trainer_settings), trainer_settings)
    thread.run(service.start())
    thread.run(service.bus.start())
    yield f"http://127.0.0.1:{service.http_port}"
    thread.run(service.bus.stop())
    thread.run(service.stop())
    for schemas in (runs, feedback):
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
    assert_clear(case.call_and_validate(base_url=gateway_url, checks=ALL_CHECKS))


@FEEDBACK.parametrize()
@FUZZ
def test_the_feedback_api_answers_any_request_without_a_server_error(case: Any, feedback_url: str) -> None:
    assert_clear(case.call_and_validate(base_url=feedback_url, checks=ALL_CHECKS))


@TRAINER.parametrize()
@FUZZ
def test_the_trainer_api_answers_any_request_without_a_server_error(case: Any, trainer_url: str) -> None:
    assert_clear(case.call_and_validate(base_url=trainer_url, checks=ALL_CHECKS))
