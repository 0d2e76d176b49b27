"""The bus on every transport: batches, dead letters, dedupe; Kafka bindings through TestKafkaBroker."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from faststream.kafka import TestKafkaBroker
from flockwatch.common import topics
from flockwatch.common.bus import Bus, create_bus
from flockwatch.common.bus_faststream import FastStreamBus
from flockwatch.common.events import DeadLetter, Event, TextSubmitted, Vote
from flockwatch.common.settings import CommonSettings

from tests.integration.kafka_echo_worker import echo

CONNECTED = ["memory://", "redis://127.0.0.1:6379/8", "nats://127.0.0.1:4222", "kafka (a Tansu broker)"]


def voter_and_sinks(bus: Bus, group: str) -> tuple[list[Vote], list[DeadLetter], list[int]]:
    """A voter that echoes a vote per text, and collectors for votes and dead letters."""
    votes: list[Vote] = []
    dead: list[DeadLetter] = []
    batches: list[int] = []

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=group)
    async def vote(msgs: list[TextSubmitted]) -> list[Event]:
        batches.append(len(msgs))
        if any(m.text == "explode" for m in msgs):
            raise RuntimeError("this text breaks the handler")
        return echo(msgs)

    @bus.subscribe(topics.VOTE_CAST, Vote, group=f"{group}-votes")
    async def keep_votes(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    @bus.subscribe(topics.DEAD_LETTER, DeadLetter, group=f"{group}-dead")
    async def keep_dead(msgs: list[DeadLetter]) -> list[Event]:
        dead.extend(msgs)
        return []

    return votes, dead, batches


async def purge_nats(url: str) -> None:
    """Empty the JetStream stream: a new durable consumer would otherwise replay earlier runs."""
    import nats
    from nats.js.errors import NotFoundError

    client = await nats.connect(url)
    try:
        await client.jetstream().purge_stream("flockwatch")
    except NotFoundError:
        pass
    finally:
        await client.close()


async def until(condition: object, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)


async def empty_bus(url: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The bus URL of one of CONNECTED, emptied: Kafka a broker of its own (its env set), the Redis database
    flushed, the JetStream stream purged (counts of dead letters assume empty topics)."""
    if url.startswith("kafka"):
        broker = request.getfixturevalue("fresh_tansu")
        for name, value in broker.env.items():
            monkeypatch.setenv(name, value)
        return broker.url
    if url.startswith("redis"):
        import redis.asyncio as aioredis

        await aioredis.from_url(url).flushdb()
    if url.startswith("nats"):
        await purge_nats(url)
    return url


@pytest.mark.parametrize("url", CONNECTED)
async def test_batches_flow_poison_goes_to_dead_letter_and_repeats_are_dropped(
    url: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await empty_bus(url, request, monkeypatch)
    group = f"g{uuid.uuid4().hex[:8]}"  # fresh consumer groups: NATS keeps durable consumers between runs
    bus = create_bus(CommonSettings(bus_url=url, instance_id=group, batch_wait_ms=5))
    votes, dead, batches = voter_and_sinks(bus, group)
    async with bus:
        await asyncio.sleep(0.3)
        msgs = [TextSubmitted(message_id=f"{group}-{i}", text_id=f"{group}-{i}", text="hi") for i in range(300)]
        await bus.publish(msgs)
        await bus.publish(msgs[:50])  # redelivered duplicates
        await bus.publish_raw(topics.TEXT_SUBMITTED, b"{not json", "k")
        await bus.publish_raw(topics.TEXT_SUBMITTED, b"\xff\xfe", "k")
        await bus.publish([TextSubmitted(message_id=f"{group}-x", text_id=f"{group}-x", text="explode")])
        # Within 20 s on every transport, NATS included: a JetStream fetch that timed out mid-batch used to
        # stall the batch for the 30 s ack wait (flockwatch.common.nats_compat; test_nats_jetstream.py)
        await until(
            lambda: (
                len({v.text_id for v in votes if v.text_id.startswith(group)}) >= 300
                and len([d for d in dead if d.consumer == group]) >= 3
            ),
            seconds=20,
        )
        await asyncio.sleep(0.3)
    dead = [d for d in dead if d.consumer == group]  # JetStream keeps earlier runs' dead letters
    mine = [v for v in votes if v.text_id.startswith(group)]
    assert sorted(v.text_id for v in mine) == sorted(m.text_id for m in msgs)  # each exactly once
    assert max(batches) > 1  # consumed in batches
    errors = sorted(d.error.split(":")[0] for d in dead)
    assert errors == ["RuntimeError", "invalid TextSubmitted", "invalid TextSubmitted"]
    assert {d.topic for d in dead} == {topics.TEXT_SUBMITTED}


async def test_kafka_bindings_through_test_kafka_broker() -> None:
    bus = create_bus(CommonSettings(bus_url="kafka://127.0.0.1:9092", instance_id="k1"))
    assert isinstance(bus, FastStreamBus)
    votes, dead, _ = voter_and_sinks(bus, "kafka-voter")
    bus.bind()
    async with TestKafkaBroker(bus.broker):
        await bus.publish([TextSubmitted(message_id="k-1", text_id="k-1", text="hello")])
        await bus.publish_raw(topics.TEXT_SUBMITTED, b"{broken", "k-2")
    assert [v.text_id for v in votes] == ["k-1"]
    assert [d.payload for d in dead] == ["{broken"]


def test_unknown_bus_scheme_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="memory://"):
        CommonSettings(bus_url="carrier-pigeon://coop")


async def test_consumer_lag_is_measured_per_topic_and_group_on_redis() -> None:
    """A backlog published while the consumer is stopped shows as lag; read and acknowledged, it is gone."""
    import redis.asyncio as aioredis
    from flockwatch.common import telemetry

    url = "redis://127.0.0.1:6379/9"
    await aioredis.from_url(url).flushdb()
    group = f"lag-{uuid.uuid4().hex[:6]}"
    settings = CommonSettings(_env_file=None, bus_url=url, instance_id=group, batch_wait_ms=1, lag_interval_s=0)
    seen: list[TextSubmitted] = []
    bus = create_bus(settings)
    assert isinstance(bus, FastStreamBus)
    hold = asyncio.Event()

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=group)
    async def read(msgs: list[TextSubmitted]) -> list[Event]:
        await hold.wait()  # the consumer is busy: the backlog stays
        seen.extend(msgs)
        return []

    publisher = create_bus(CommonSettings(_env_file=None, bus_url=url, instance_id=f"{group}-p"))
    async with bus, publisher:
        await publisher.publish([TextSubmitted(message_id=f"m{i}", text_id=f"t{i}", text="hi") for i in range(300)])
        lag = await bus.redis_lag()
        backlog, pending = lag[(topics.TEXT_SUBMITTED, group)]
        assert backlog is not None and backlog + pending == 300 and backlog > 0
        sample = telemetry.CONSUMER_LAG.labels(topics.TEXT_SUBMITTED, group, "group")._value.get()  # noqa: SLF001
        assert sample == backlog
        hold.set()
        await until(lambda: len(seen) == 300)
        await until(lambda: False, 0.5)  # the last acknowledgements
        assert (await bus.redis_lag())[(topics.TEXT_SUBMITTED, group)] == (0, 0)
