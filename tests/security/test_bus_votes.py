"""Forged votes (issue 19, item 6): anyone who can write to the bus can publish `Vote`s for text ids nobody
submitted. The arbiter decides only texts it saw submitted; votes that come before their text still count."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from flockwatch.arbiter import join
from flockwatch.arbiter.app import ArbiterService
from flockwatch.arbiter.join import JoinStore, MemoryJoinStore, RedisJoinStore
from flockwatch.arbiter.settings import ArbiterSettings
from flockwatch.common import topics
from flockwatch.common.bus_memory import MemoryBus
from flockwatch.common.events import Decision, Event, TextSubmitted

from tests.integration.test_arbiter_cascade import CHEAP
from tests.integration.test_arbiter_lease import cheap_votes, policy_bundle  # noqa: F401 - a fixture
from tests.unit.test_arbiter_policy import vote

URL = "redis://127.0.0.1:6379/9"
DEADLINE_MS = 200


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[JoinStore]:
    """A join store; the Redis one under its own prefix, dropped afterwards."""
    if request.param == "memory":
        yield MemoryJoinStore()
        return
    prefix = f"fw:test:{uuid.uuid4().hex[:8]}:"
    yield RedisJoinStore(URL, prefix)
    cleanup = aioredis.from_url(URL)
    await cleanup.delete(*[k async for k in cleanup.scan_iter(f"{prefix}*")] or ["none"])
    await cleanup.aclose()


@pytest.fixture
async def arbiter(policy_bundle: Path, store: JoinStore) -> AsyncIterator[tuple[MemoryBus, list[Decision]]]:  # noqa: F811
    """A running arbiter (synthetic policy, cascade off) on the in-process bus, and the decisions it publishes."""
    settings = ArbiterSettings(
        _env_file=None,
        model_dir=policy_bundle,
        bus_url="memory://",
        arbiter_deadline_ms=DEADLINE_MS,
        arbiter_cascade=False,
        batch_wait_ms=0,
    )
    bus = MemoryBus(settings)
    service = ArbiterService(bus, settings)
    service.store = store
    decided: list[Decision] = []

    @bus.subscribe(topics.DECISION_MADE, Decision, group="test-decisions")
    async def keep(msgs: list[Decision]) -> list[Event]:
        decided.extend(msgs)
        return []

    await service.start()
    async with bus:
        yield bus, decided
    await service.stop()


def text(i: int) -> TextSubmitted:
    return TextSubmitted(message_id=f"m{i}", text_id=f"t{i}", text=f"text {i}")


@pytest.mark.parametrize("voters", [CHEAP, CHEAP[:1]], ids=["every voter", "one voter"])
async def test_votes_for_texts_never_submitted_make_no_decision(
    arbiter: tuple[MemoryBus, list[Decision]], voters: Sequence[str]
) -> None:
    bus, decided = arbiter
    await bus.publish([text(0)])
    await bus.publish(cheap_votes(4, voters))  # t0 was submitted; t1 … t3 never were
    await asyncio.sleep(5 * DEADLINE_MS / 1000)  # each text's deadline passed, several times over
    assert [d.text_id for d in decided] == ["t0"]


async def test_votes_that_come_before_their_text_are_decided_with_it(
    arbiter: tuple[MemoryBus, list[Decision]],
) -> None:
    bus, decided = arbiter
    await bus.publish(cheap_votes(3, CHEAP))  # the voters read the texts ahead of the arbiter
    await asyncio.sleep(0.05)
    assert decided == []  # complete, but no text seen yet: not decided from votes alone
    await bus.publish([text(i) for i in range(3)])
    for _ in range(100):
        if len(decided) >= 3:
            break
        await asyncio.sleep(0.02)
    assert sorted(d.text_id for d in decided) == ["t0", "t1", "t2"]
    assert all(d.path != "no_votes" and len(d.votes) == len(CHEAP) for d in decided)


async def test_votes_whose_text_never_comes_are_dropped_after_a_grace_period(
    store: JoinStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(join, "UNSEEN_S", 0.1)
    assert await store.add_votes([vote("a", {"x": 1.0}, text_id="ghost")], expected=1, deadline_s=0.05) == []
    now = time.time()
    assert await store.pop_expired(now + 0.06) == []  # its deadline: it waits once more for its text
    assert store.next_deadline is not None
    assert await store.pop_expired(now + 0.5) == []  # still no text: dropped
    assert store.next_deadline is None
    await store.add_texts([("ghost", time.time())], 0.05)  # a text under that id now starts afresh: no old votes
    [ready] = await store.pop_expired(time.time() + 1)
    assert ready.text_id == "ghost" and ready.votes == []
