"""The security tests' world: a gateway on a bundle that is only a manifest, an arbiter fake that decides like the
real one (each text id once, first come first decided), and tokens for two tenants and an admin."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx
from flockwatch.common import topics
from flockwatch.common.artifacts import Manifest, write_manifest
from flockwatch.common.bus import Bus
from flockwatch.common.events import Decision, Event, TextSubmitted, Vote
from flockwatch.common.tokens import add_token

from tests.integration.feedback_support import DSN, fresh_schema

REDIS = "redis://127.0.0.1:6379/3"  # cache keys under a prefix of each test's own, deleted after it
SPAM = "WINNER!! You have won a £1000 cash prize. Call 09061701461 now to claim, T&C apply"
HAM = "are we still on for lunch today?"
VERSIONS = {"arbiter": "fake-arbiter-1", "fake": "fake-voter-1"}


def fake_bundle(directory: Path) -> Path:
    """A bundle directory holding only a manifest: enough for the gateway's cache to know the versions."""
    directory.mkdir(parents=True, exist_ok=True)
    write_manifest(directory, Manifest(name="sms", version="fake-1", components=VERSIONS))
    return directory


def label_of(text: str) -> str:
    return "spam" if "WIN" in text else "ham"


def fake_arbiter(delay_s: float = 0.0, decided: list[str] | None = None) -> Callable[[Bus], object]:
    """A consumer deciding each text id once (repeats dropped, as the arbiter's claim drops them), after
    `delay_s`, as spam when the text holds 'WIN'; the ids it decided go to `decided`."""
    seen: set[str] = set()

    def register(bus: Bus) -> None:
        @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group="fake-arbiter")
        async def decide(msgs: list[TextSubmitted]) -> list[Event]:
            fresh = [m for m in msgs if m.text_id not in seen]
            seen.update(m.text_id for m in fresh)
            if delay_s:
                await asyncio.sleep(delay_s)
            if decided is not None:
                decided.extend(m.text_id for m in fresh)
            return [decision(m.text_id, label_of(m.text)) for m in fresh]

    return register


def decision(text_id: str, label: str) -> Decision:
    probabilities = {label: 0.9, "ham" if label == "spam" else "spam": 0.1}
    vote = Vote(
        message_id=Vote.id_for(text_id, "fake"),
        text_id=text_id,
        voter="fake",
        model_version=VERSIONS["fake"],
        probabilities=probabilities,
        latency_ms=0.1,
    )
    return Decision(
        message_id=Decision.id_for(text_id),
        text_id=text_id,
        prediction=label,
        confidence=0.9,
        abstain=False,
        prediction_set=[label],
        probabilities=probabilities,
        path="consensus",
        votes=[vote],
        arbiter_version=VERSIONS["arbiter"],
        thresholds={},
        latency_ms=1.0,
    )


class Tenants(NamedTuple):
    path: Path
    alice: dict[str, str]  # bearer headers
    bob: dict[str, str]
    admin: dict[str, str]
    names: dict[str, str]  # alice/bob/admin → token name


def tenants(directory: Path) -> Tenants:
    """A token file with two predict tokens and an admin one (names unique per test)."""
    path = directory / "tokens.yaml"
    names = {who: f"{who}-{uuid.uuid4().hex[:8]}" for who in ("alice", "bob", "admin")}
    made = {
        who: {"Authorization": f"Bearer {add_token(path, name, ['admin' if who == 'admin' else 'predict'])}"}
        for who, name in names.items()
    }
    return Tenants(path, made["alice"], made["bob"], made["admin"], names)


@asynccontextmanager
async def key_prefix(tag: str) -> AsyncIterator[str]:
    """A Redis key prefix for one test alone (under `REDIS`); its keys are deleted afterwards."""
    import redis.asyncio as aioredis

    name = f"fwtest:{tag}:{uuid.uuid4().hex[:8]}"
    yield name
    client = aioredis.from_url(REDIS)
    keys = [k async for k in client.scan_iter(match=f"{name}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def cached_keys(prefix: str) -> list[str]:
    """The keys under `prefix`, sorted."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS)
    try:
        return sorted([k.decode() async for k in client.scan_iter(match=f"{prefix}:*")])
    finally:
        await client.aclose()


async def until(check: Callable[[], object], what: str, seconds: float = 10.0) -> None:
    """Wait for `check()` (sync or async) to be truthy."""
    for _ in range(int(seconds / 0.02)):
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {seconds} s")


@asynccontextmanager
async def trainer_api(directory: Path, **overrides: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """A started trainer (fresh schemas on the real Postgres, no champion, no HTTP server of its own) and a client
    on its API."""
    from flockwatch.common.bus import create_bus
    from flockwatch.trainer.api import create_app
    from flockwatch.trainer.app import TrainerService
    from flockwatch.trainer.settings import TrainerSettings

    async with fresh_schema() as schema, fresh_schema() as feedback_schema:
        settings = TrainerSettings(
            _env_file=None,
            bus_url="memory://",
            trainer_database_url=DSN,
            trainer_db_schema=schema,
            trainer_feedback_schema=feedback_schema,
            trainer_serve_http=False,
            trainer_models_root=directory,
            model_dir=directory / "current",
            **overrides,
        )
        service = TrainerService(create_bus(settings), settings)
        await service.start()
        app = create_app(service)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://trainer") as client:
                yield service, client
        finally:
            await service.stop()
            await app.state.guard.aclose()
