"""NATS JetStream, on a real server: one group reading two topics gets each topic's messages only; a fetch that
times out mid-batch hands on what it fetched, instead of stalling it 30 s.

nats-py raises the builtin TimeoutError where its deadline runs out between the no-wait probe and the lingering
pull; FastStream's pull loop caught only nats-py's own, lost the partial batch, and JetStream redelivered it after
the ack wait (`flockwatch.common.nats_compat`). Here the inner fetch is made to raise it right after a batch
arrived, on a real NATS server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import nats.errors
import pytest
from flockwatch.common import topics
from flockwatch.common.bus import create_bus
from flockwatch.common.events import DeadLetter, Event, TextSubmitted, Vote
from flockwatch.common.nats_compat import patch_fetch_timeouts
from flockwatch.common.settings import CommonSettings
from nats.js.client import JetStreamContext

from tests.integration.kafka_echo_worker import echo
from tests.integration.test_bus import purge_nats, until

URL = "nats://127.0.0.1:4222"


async def test_one_group_on_two_topics_gets_each_topics_messages_only() -> None:
    # the arbiter's shape: one group, texts and votes (one durable consumer per group and topic)
    await purge_nats(URL)
    group = f"g{uuid.uuid4().hex[:8]}"
    bus = create_bus(CommonSettings(bus_url=URL, instance_id=group, batch_wait_ms=5, bus_key="k"))
    texts: list[str] = []
    votes: list[str] = []

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=group)
    async def read_texts(msgs: list[TextSubmitted]) -> list[Event]:
        texts.extend(m.text_id for m in msgs)
        return []

    @bus.subscribe(topics.VOTE_CAST, Vote, group=group)
    async def read_votes(msgs: list[Vote]) -> list[Event]:
        votes.extend(m.text_id for m in msgs)
        return []

    dead: list[DeadLetter] = []

    @bus.subscribe(topics.DEAD_LETTER, DeadLetter, group=f"{group}-dead")
    async def keep_dead(msgs: list[DeadLetter]) -> list[Event]:
        dead.extend(msgs)
        return []

    async with bus:
        await asyncio.sleep(0.3)
        msgs = [TextSubmitted(message_id=f"{group}-{i}", text_id=f"t{i}", text="hi") for i in range(20)]
        await bus.publish(msgs)
        await bus.publish(echo(msgs))
        await until(lambda: len(texts) >= 20 and len(votes) >= 20, seconds=20)
        await asyncio.sleep(0.5)
    assert sorted(texts) == sorted(votes) == sorted(f"t{i}" for i in range(20))
    assert [d for d in dead if d.consumer == group] == []  # before: the votes handler got texts, dead-lettered


def test_the_shim_is_idempotent_and_keeps_nats_timeouts() -> None:
    patch_fetch_timeouts()
    once = JetStreamContext.PullSubscription.fetch
    patch_fetch_timeouts()
    assert JetStreamContext.PullSubscription.fetch is once


async def test_a_builtin_timeout_mid_batch_does_not_stall_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    await purge_nats(URL)
    original = JetStreamContext.PullSubscription._fetch_n
    state = {"got": False, "injected": 0}

    async def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        if state["got"] and not state["injected"]:  # the call right after a batch arrived: the deadline ran out
            state["injected"] += 1
            raise TimeoutError  # what nats-py 2.16 raises there (not nats.errors.TimeoutError)
        msgs = await original(self, *args, **kwargs)
        state["got"] = state["got"] or bool(msgs)
        return msgs

    monkeypatch.setattr(JetStreamContext.PullSubscription, "_fetch_n", flaky)
    group = f"g{uuid.uuid4().hex[:8]}"
    bus = create_bus(CommonSettings(bus_url=URL, instance_id=group, batch_wait_ms=200))
    seen: list[str] = []

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=group)
    async def read(msgs: list[TextSubmitted]) -> list[Event]:
        seen.extend(m.text_id for m in msgs)
        return []

    async with bus:
        await asyncio.sleep(0.3)
        msgs = [TextSubmitted(message_id=f"{group}-{i}", text_id=f"{group}-{i}", text="hi") for i in range(5)]
        start = time.monotonic()
        await bus.publish(msgs)
        await until(lambda: len(set(seen)) >= 5, seconds=40)
        took = time.monotonic() - start
    assert state["injected"] == 1  # the fault happened
    assert sorted(set(seen)) == sorted(m.text_id for m in msgs)
    assert took < 10, f"the partial batch waited {took:.1f} s: redelivered after the ack wait, not handed on"


async def test_the_shim_turns_the_builtin_timeout_into_nats_own(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_fetch_timeouts()

    async def late(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise TimeoutError

    monkeypatch.setattr(JetStreamContext.PullSubscription, "_fetch_n", late)
    sub: Any = object.__new__(JetStreamContext.PullSubscription)
    sub._sub = object()  # fetch only checks that there is one before it calls _fetch_n
    with pytest.raises(nats.errors.TimeoutError):
        await JetStreamContext.PullSubscription.fetch(sub, batch=5, timeout=0.01)
