"""Publishing on Redis Streams: one transaction per event-loop turn, and a batch acknowledged only with what
its handling published (never before)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from flockwatch.common import bus_faststream, envelope, topics
from flockwatch.common.bus import Ack, Bus, BusUnavailable, create_bus
from flockwatch.common.bus_faststream import FastStreamBus
from flockwatch.common.events import Event, TextSubmitted, Vote
from flockwatch.common.settings import CommonSettings

from tests.integration.kafka_echo_worker import echo
from tests.integration.test_bus import until

URL = "redis://127.0.0.1:6379/11"


def texts(run: str, n: int) -> list[TextSubmitted]:
    return [TextSubmitted(message_id=f"{run}-{i}", text_id=f"{run}-{i}", text=f"text {i}") for i in range(n)]


def count_transactions(bus: Bus) -> list[int]:
    """Each transaction's number of XADDs, recorded as it leaves."""
    assert isinstance(bus, FastStreamBus) and bus._redis_sender is not None
    sender, sizes = bus._redis_sender, []
    send = sender._transaction

    async def counted(args: list[bytes]) -> None:
        sizes.append(int(args[1]))  # the script's entry count
        await send(args)

    sender._transaction = counted  # type: ignore[method-assign]
    return sizes


async def test_concurrent_publishes_of_one_loop_turn_leave_in_one_transaction() -> None:
    client = aioredis.from_url(URL)
    await client.flushdb()
    run = uuid.uuid4().hex[:8]
    bus = create_bus(CommonSettings(bus_url=URL, instance_id=run))
    sizes = count_transactions(bus)
    async with bus:
        await asyncio.gather(*(bus.publish([t]) for t in texts(run, 50)))  # 50 requests in flight at once
        await bus.publish(texts(f"{run}-later", 3))
    assert sizes == [50, 3]
    assert await client.xlen(topics.TEXT_SUBMITTED) == 53
    await client.aclose()


async def test_a_batch_is_acknowledged_only_with_its_published_outputs() -> None:
    """The voter's first output publishes fail (the broker unreachable past the retry window): its batch stays
    pending, unacknowledged; the reclaimer hands it over again and it is acknowledged with its votes."""
    client = aioredis.from_url(URL)
    await client.flushdb()
    run = uuid.uuid4().hex[:8]
    settings = CommonSettings(bus_url=URL, instance_id=run, publish_retry_s=0.2, redis_claim_idle_ms=400)
    bus = create_bus(settings)
    handled: list[int] = []
    votes: list[Vote] = []

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group="voter")
    async def vote(msgs: list[TextSubmitted]) -> list[Event]:
        handled.append(len(msgs))
        return echo(msgs)

    @bus.subscribe(topics.VOTE_CAST, Vote, group="votes")
    async def keep(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    assert isinstance(bus, FastStreamBus) and bus._redis_sender is not None
    sender = bus._redis_sender
    send, failing = sender._transaction, [True]

    async def flaky(args: list[bytes]) -> None:
        if failing[0] and any(b'"voter"' in arg for arg in args):
            raise ConnectionError("broker unreachable")
        await send(args)

    sender._transaction = flaky  # type: ignore[method-assign]
    given_up: list[int] = []  # sizes of the batches whose publishing failed for good (BusUnavailable)
    dispatch = bus.dispatch

    async def watched(route: Any, items: Any, headers: Any = None, ack: Any = None) -> None:
        try:
            await dispatch(route, items, headers, ack)
        except BusUnavailable:
            given_up.append(len(items))
            raise

    bus.dispatch = watched  # type: ignore[method-assign]
    async with bus:
        await bus.publish(texts(run, 5))
        await until(lambda: sum(given_up) >= 5)
        pending = await client.xpending(topics.TEXT_SUBMITTED, "voter")
        assert pending["pending"] == 5 and not votes  # handled, nothing published, nothing acknowledged
        failing[0] = False
        await until(lambda: len({v.text_id for v in votes}) == 5)
        await until(lambda: False, 0.3)
        pending = await client.xpending(topics.TEXT_SUBMITTED, "voter")
    assert {v.text_id for v in votes} == {t.text_id for t in texts(run, 5)}
    assert pending["pending"] == 0 and sum(handled) >= 10  # handled again after the failure, then acknowledged
    await client.aclose()


async def test_one_script_call_acknowledges_thousands_of_entries() -> None:
    """Acknowledgements go out in chunks (Lua's unpack has a stack limit): 2,500 ids in one call all clear."""
    client = aioredis.from_url(URL)
    await client.flushdb()
    run = uuid.uuid4().hex[:8]
    stream = f"acks.{run}"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    for start in range(0, 2500, 500):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start, start + 500):
                pipe.xadd(stream, {"i": i})
            await pipe.execute()
    read = await client.xreadgroup("g", "c", {stream: ">"}, count=5000)
    ids = [entry_id for entry_id, _ in read[0][1]]
    assert len(ids) == 2500 and (await client.xpending(stream, "g"))["pending"] == 2500
    bus = create_bus(CommonSettings(bus_url=URL, instance_id=run))
    async with bus:
        await bus.publish(texts(run, 2), ack=Ack(stream, "g", ids))
    assert (await client.xpending(stream, "g"))["pending"] == 0
    assert await client.xlen(topics.TEXT_SUBMITTED) == 2
    await client.aclose()


async def test_an_acknowledgement_without_outputs_rides_with_the_next_transaction_or_goes_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bus_faststream, "ACK_DELAY_S", 1.0)  # long enough that nothing goes before it is checked
    client = aioredis.from_url(URL)
    await client.flushdb()
    run = uuid.uuid4().hex[:8]
    stream = f"acks.{run}"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    for i in range(4):
        await client.xadd(stream, {"i": i})
    read = await client.xreadgroup("g", "c", {stream: ">"}, count=10)
    ids = [entry_id for entry_id, _ in read[0][1]]
    bus = create_bus(CommonSettings(bus_url=URL, instance_id=run))
    sizes = count_transactions(bus)
    async with bus:
        await bus.publish([], ack=Ack(stream, "g", ids[:2]))  # returns at once, nothing sent yet
        assert sizes == [] and (await client.xpending(stream, "g"))["pending"] == 4
        await bus.publish(texts(run, 1))  # the acknowledgement goes with it: one call
        assert sizes == [1] and (await client.xpending(stream, "g"))["pending"] == 2
        await bus.publish([], ack=Ack(stream, "g", ids[2:]))
        await until(lambda: len(sizes) == 2)  # alone, once ACK_DELAY_S has passed
        assert (await client.xpending(stream, "g"))["pending"] == 0
        await bus.publish([], ack=Ack(stream, "g", ids[:1]))  # pending at stop: sent before the bus closes
    assert sizes == [1, 0, 0]
    await client.aclose()


async def test_every_entry_carries_the_json_content_type_beside_its_own_headers() -> None:
    client = aioredis.from_url(URL)
    await client.flushdb()
    bus = create_bus(CommonSettings(bus_url=URL, instance_id=uuid.uuid4().hex[:8]))
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    async with bus:
        await bus.publish_raw("headers.test", b"{}", "k", trace)
        await bus.publish_raw("headers.test", b"{}", "k")
    entries = await client.xrange("headers.test")
    headers = [envelope.parse(fields[b"__data__"])[1] for _, fields in entries]
    assert [h["content-type"] for h in headers] == ["application/json"] * 2
    assert headers[0]["traceparent"] == trace["traceparent"] and "traceparent" not in headers[1]
    await client.aclose()
