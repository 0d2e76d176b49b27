"""Co-hosted services (`Bus.cohost`): one subscription per topic for the services of a process, over Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import redis.asyncio as aioredis
from flockwatch.cli.runtime import build
from flockwatch.common import topics
from flockwatch.common.bus import Bus, create_bus
from flockwatch.common.events import DeadLetter, Event, TextSubmitted, Vote
from flockwatch.common.settings import CommonSettings

from tests.integration.kafka_echo_worker import echo
from tests.integration.test_bus import until

URL = "redis://127.0.0.1:6379/10"


def texts(run: str, n: int, text: str = "hi") -> list[TextSubmitted]:
    return [TextSubmitted(message_id=f"{run}-{i}", text_id=f"{run}-{i}", text=text) for i in range(n)]


def voter(bus: Bus, name: str, calls: Counter[str], transient_once: list[bool] | None = None) -> None:
    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=name)
    async def vote(msgs: list[TextSubmitted]) -> list[Event]:
        calls[name] += len(msgs)
        if any(m.text == "explode" for m in msgs) and name == "b":
            raise RuntimeError("this text breaks voter b")
        if transient_once and transient_once[0]:
            transient_once[0] = False
            raise ConnectionError("a dependency is down for a moment")
        return [v.model_copy(update={"voter": name, "message_id": Vote.id_for(v.text_id, name)}) for v in echo(msgs)]


def sinks(bus: Bus, run: str) -> tuple[list[Vote], list[DeadLetter]]:
    votes: list[Vote] = []
    dead: list[DeadLetter] = []

    @bus.subscribe(topics.VOTE_CAST, Vote, group=f"{run}-votes", broadcast=True)
    async def keep_votes(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    @bus.subscribe(topics.DEAD_LETTER, DeadLetter, group=f"{run}-dead", broadcast=True)
    async def keep_dead(msgs: list[DeadLetter]) -> list[Event]:
        dead.extend(msgs)
        return []

    return votes, dead


async def test_cohosted_handlers_read_each_text_once_and_all_vote() -> None:
    client = aioredis.from_url(URL)
    await client.flushdb()
    run = uuid.uuid4().hex[:8]
    bus = create_bus(CommonSettings(bus_url=URL, instance_id=run))
    calls: Counter[str] = Counter()
    voter(bus, "b", calls)
    voter(bus, "a", calls)
    votes, dead = sinks(bus, run)
    bus.cohost()
    [fused] = [r for r in bus.routes if r.topic == topics.TEXT_SUBMITTED]
    assert fused.group == "a+b"  # the broadcast sinks stay as they were
    async with bus:
        await bus.publish(texts(run, 200))
        await bus.publish(texts(f"{run}-x", 1, "explode"))
        await until(lambda: len(votes) >= 401 and dead)
        await asyncio.sleep(0.2)
        groups = await client.xinfo_groups(topics.TEXT_SUBMITTED)
    assert [g["name"] for g in groups] == [b"a+b"]  # one group: each entry read once, for both handlers
    assert groups[0]["entries-read"] == 201 and groups[0]["pending"] == 0
    # the text that breaks voter b is dead-lettered for b alone; a's vote on it is published
    assert Counter(v.voter for v in votes) == {"a": 201, "b": 200}
    assert len({(v.text_id, v.voter) for v in votes}) == 401
    [letter] = dead
    assert letter.consumer == "b" and "breaks voter b" in letter.error
    await client.aclose()


async def test_a_transient_failure_of_one_handler_gives_the_batch_back_to_all() -> None:
    client = aioredis.from_url(URL)
    await client.flushdb()
    run = uuid.uuid4().hex[:8]
    bus = create_bus(CommonSettings(bus_url=URL, instance_id=run, redis_claim_idle_ms=300))
    calls: Counter[str] = Counter()
    voter(bus, "a", calls)
    voter(bus, "b", calls, transient_once=[True])
    votes, _ = sinks(bus, run)
    bus.cohost()
    async with bus:
        await bus.publish(texts(run, 5))
        await until(lambda: len(votes) >= 10)
        await asyncio.sleep(0.5)
        pending = await client.xpending(topics.TEXT_SUBMITTED, "a+b")
    assert calls["a"] >= 10 and calls["b"] >= 10  # both handled the batch again
    assert Counter(v.voter for v in votes) == {"a": 5, "b": 5}  # the failed round published nothing
    assert pending["pending"] == 0
    await client.aclose()


def test_services_named_together_share_their_subscriptions_on_a_broker_only() -> None:
    names = ["regex_voter", "classical_voter", "ws_voter"]
    bus, services = build(names, CommonSettings(bus_url=URL))
    assert len(services) == 3
    assert [r.group for r in bus.routes if r.topic == topics.TEXT_SUBMITTED] == ["classical_voter+regex_voter+ws_voter"]
    assert sorted(r.group for r in bus.routes if r.broadcast) == sorted(names)  # model reloads stay per service
    embedded, _ = build(names, CommonSettings(bus_url="memory://"))
    assert sorted(r.group for r in embedded.routes if r.topic == topics.TEXT_SUBMITTED) == sorted(names)
    alone, _ = build(["regex_voter"], CommonSettings(bus_url=URL))
    assert [r.group for r in alone.routes if r.topic == topics.TEXT_SUBMITTED] == ["regex_voter"]
