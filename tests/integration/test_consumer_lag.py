"""Consumer lag per topic and work group on Kafka (a real Tansu broker) and NATS JetStream, read by the bus and
exported as `flockwatch_consumer_lag` / `flockwatch_consumer_pending`; the watcher that reads it periodically.

Each test has a topic and a group of its own (brokers keep consumer groups and durable consumers between runs).
A handler that takes one message at a time (`batch_max=1`) and blocks on it holds the backlog: N published,
1 delivered and not yet acknowledged (pending), N - 1 not yet delivered (lag); released, both drain to 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from flockwatch.common import bus_faststream, kafka_config
from flockwatch.common.bus import create_bus
from flockwatch.common.bus_faststream import FastStreamBus, LagReadings
from flockwatch.common.events import Event, TextSubmitted
from flockwatch.common.kafka_dev import DEV_FETCH_WAIT_MS, DEV_SESSION_TIMEOUT_MS, TansuBroker
from flockwatch.common.settings import CommonSettings
from prometheus_client import REGISTRY

NATS_URL = "nats://127.0.0.1:4222"
N = 20


def gauge(name: str, topic: str, group: str) -> float | None:
    """A lag gauge's value as Prometheus would scrape it, of either scope (None: no such series)."""
    for scope in ("group", "instance"):
        value = REGISTRY.get_sample_value(name, {"topic": topic, "group": group, "scope": scope})
        if value is not None:
            return value
    return None


def gauges(topic: str, group: str) -> tuple[float | None, float | None]:
    """(flockwatch_consumer_lag, flockwatch_consumer_pending) of a topic and group."""
    return gauge("flockwatch_consumer_lag", topic, group), gauge("flockwatch_consumer_pending", topic, group)


async def eventually(read: Callable[[], Awaitable[Any]], expected: Any, seconds: float = 10.0) -> None:
    """Read until `expected` comes back; fail with the last reading after `seconds`."""
    deadline = time.monotonic() + seconds
    while (got := await read()) != expected:
        assert time.monotonic() < deadline, f"still {got!r}, expected {expected!r}"
        await asyncio.sleep(0.05)


def now(value: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """`value` as a reading for `eventually`."""

    async def read() -> Any:
        return value()

    return read


def items(topic: str, n: int) -> list[tuple[str, bytes, str, None]]:
    """n valid TextSubmitted messages on `topic` (a topic of the test's own), keyed over every partition."""
    tag = uuid.uuid4().hex[:6]
    texts = [TextSubmitted(message_id=f"{tag}-{i}", text_id=f"{tag}-{i}", text="hi") for i in range(n)]
    return [(topic, t.model_dump_json().encode(), t.key, None) for t in texts]


def blocked_bus(settings: CommonSettings, topic: str, group: str) -> tuple[FastStreamBus, asyncio.Event, list[Any]]:
    """A bus whose one work group on `topic` takes a message and waits for the returned event (`hold`)."""
    bus = create_bus(settings)
    assert isinstance(bus, FastStreamBus)
    hold = asyncio.Event()
    seen: list[TextSubmitted] = []

    @bus.subscribe(topic, TextSubmitted, group=group)
    async def read(msgs: list[TextSubmitted]) -> list[Event]:
        seen.extend(msgs)
        await hold.wait()
        return []

    return bus, hold, seen


async def settled(read: Callable[[], Awaitable[LagReadings]], key: Any, seconds: float = 10.0) -> tuple[int, int]:
    """The first (lag, pending) of `key` that accounts for all N messages and that the next reading repeats."""
    deadline = time.monotonic() + seconds
    last = None
    while True:
        got = (await read()).get(key)
        if got is not None and sum(got) == N and got == last:
            return got
        assert time.monotonic() < deadline, f"still {got!r}, expected a steady reading summing to {N}"
        last = got
        await asyncio.sleep(0.1)


async def check_backlog_then_drained(
    bus: FastStreamBus,
    read: Callable[[], Awaitable[LagReadings]],
    hold: asyncio.Event,
    seen: list[Any],
    key: Any,
    *,
    prefetched: bool = False,
) -> None:
    topic, group = key
    await eventually(now(lambda: len(seen)), 1)  # the handler holds its first message
    if prefetched:
        # NATS: pull requests the client sent before the publish (each for one message, 1 ms wait, expiring later
        # on the server) may each have been answered: those messages sit in the client's queue, delivered and not
        # acknowledged. Every message is still either not delivered (lag) or delivered and not acknowledged.
        lag, pending = await settled(read, key)
        assert 1 <= pending < N, (lag, pending)
    else:
        lag, pending = N - 1, 1  # exact: N - 1 not delivered, 1 delivered and not acknowledged
    # the watcher (lag_interval_s) exports it on its own
    await eventually(now(lambda: gauge("flockwatch_consumer_lag", topic, group)), lag)
    await eventually(read, {key: (lag, pending)})
    # eventually: a reading of the watcher's begun before this one may end after it
    await eventually(now(lambda: gauges(topic, group)), (lag, pending))
    hold.set()
    await eventually(now(lambda: len(seen)), N)
    await eventually(read, {key: (0, 0)})
    await eventually(now(lambda: gauges(topic, group)), (0, 0))
    assert await bus.consumer_lag() == {key: (0, 0)}  # the transport-independent entry point


async def test_kafka_lag_per_topic_and_group(tansu: TansuBroker) -> None:
    """Kafka: the sum over this process's partitions of end − position (lag) and position − committed."""
    tag = uuid.uuid4().hex[:8]
    topic, group = f"flockwatch.lag-{tag}", f"lag-{tag}"
    common: dict[str, Any] = {
        "_env_file": None,
        "bus_url": tansu.url,
        "kafka_session_timeout_ms": DEV_SESSION_TIMEOUT_MS,
        "kafka_fetch_wait_ms": DEV_FETCH_WAIT_MS,
    }
    # the backlog is on the broker before the consumer starts: its first fetch sees every partition's end
    await kafka_config.create_topics(tansu.bootstrap, [topic])
    async with create_bus(CommonSettings(**common, instance_id=f"{tag}-p")) as publisher:
        await publisher.publish_many(items(topic, N))
    settings = CommonSettings(**common, instance_id=tag, batch_max=1, batch_wait_ms=0, lag_interval_s=0.1)
    bus, hold, seen = blocked_bus(settings, topic, group)
    async with bus:
        try:
            await check_backlog_then_drained(bus, bus.kafka_lag, hold, seen, (topic, group))
        finally:
            hold.set()  # before stopping: a stop waits for the handler
    assert bus._lag_task is None  # noqa: SLF001 - stopped with the bus


async def test_nats_lag_per_topic_and_durable_consumer() -> None:
    """NATS JetStream: the durable consumer's num_pending (lag) and num_ack_pending (pending). Pending may be more
    than the one message the handler holds (CI once read 16 + 4): see `check_backlog_then_drained`."""
    import nats

    tag = uuid.uuid4().hex[:8]
    # a subject of its own inside the bus's stream (flockwatch.>); a dotted group: its durable is lag_<tag>
    topic, group = f"flockwatch.lag-{tag}", f"lag.{tag}"
    settings = CommonSettings(
        _env_file=None, bus_url=NATS_URL, instance_id=tag, batch_max=1, batch_wait_ms=0, lag_interval_s=0.1
    )
    bus, hold, seen = blocked_bus(settings, topic, group)
    try:
        async with bus:  # declares the stream and the durable consumer, which then waits for messages
            try:
                async with create_bus(CommonSettings(_env_file=None, bus_url=NATS_URL, instance_id=f"{tag}-p")) as p:
                    await p.publish_many(items(topic, N))
                await check_backlog_then_drained(bus, bus.nats_lag, hold, seen, (topic, group), prefetched=True)
            finally:
                hold.set()  # before stopping: a stop waits for the handler
    finally:
        client = await nats.connect(NATS_URL)
        js = client.jetstream()
        with contextlib.suppress(Exception):  # leave the shared server as it was
            await js.delete_consumer(bus_faststream.NATS_STREAM.name, bus_faststream.nats_durable(group, topic))
            await js.purge_stream(bus_faststream.NATS_STREAM.name, subject=topic)
        await client.close()
    assert bus._lag_task is None  # noqa: SLF001


async def test_lag_watcher_logs_once_retries_and_stops(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reading that hangs or fails is logged at warning once, then at debug, and retried next interval;
    cancelling the watcher (what `stop` does) ends it even in the middle of a hung reading."""
    bus = FastStreamBus(CommonSettings(_env_file=None, bus_url=NATS_URL, lag_interval_s=0.01))
    monkeypatch.setattr(bus_faststream, "LAG_READ_TIMEOUT_S", 0.05)
    calls = 0

    async def reading() -> LagReadings:
        nonlocal calls
        calls += 1
        if calls == 5:  # from the next reading on, one that hangs is not timed out (the watcher is cancelled in it)
            monkeypatch.setattr(bus_faststream, "LAG_READ_TIMEOUT_S", 3600)
        if calls == 1 or calls >= 6:
            await asyncio.sleep(3600)  # a broker that never answers
        if calls <= 3:
            raise OSError("broker down")
        return {("t", "g"): (0, 0)}

    monkeypatch.setattr(bus, "consumer_lag", reading)
    caplog.set_level(logging.DEBUG, logger=bus_faststream.log.name)
    task = asyncio.get_running_loop().create_task(bus._watch_lag())  # noqa: SLF001
    await eventually(now(lambda: calls >= 6), True, 5)
    assert not task.done()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "consumer lag" in r.getMessage()]
    assert [level for level, _ in lines] == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.INFO]
    assert "TimeoutError" in lines[0][1] and "broker down" in lines[1][1]
    task.cancel()  # in the middle of reading 6
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert task.cancelled()
