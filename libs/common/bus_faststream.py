"""The bus over FastStream brokers: Kafka (production), Redis Streams and NATS JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.message import DATA_KEY
from flockwatch.common import envelope, kafka_config, telemetry
from flockwatch.common.bus import Ack, Bus, BusUnavailable, Route
from flockwatch.common.nats_compat import patch_fetch_timeouts
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

# FastStream logs every message at `log_level`; DEBUG keeps the hot path quiet, errors still show. No dependency
# injection: the handler takes the decoded batch as it is (FastDepends resolved the `message` context in a
# worker thread, a thread hand-off per batch).
QUIET: dict[str, Any] = {"logger": logging.getLogger("faststream"), "log_level": logging.DEBUG, "apply_types": False}
JSON = {"content-type": "application/json"}
PUBLISH_CONCURRENCY = 32  # in-flight publishes per process: pipelined, within the connection pool
STREAM_MAXLEN = 1_000_000  # Redis streams are capped (approximately) so memory stays bounded
NATS_ACK_TIMEOUT_S = 5.0
# XREADGROUP BLOCK: a read returns as soon as an entry is there, so a long block costs no latency; a block of a
# few ms had every idle subscriber call Redis hundreds of times a second (a quarter of a core for five services)
REDIS_BLOCK_MS = 1_000
NATS_STREAM = JStream("flockwatch", subjects=["flockwatch.>"], declare=True)
# a broker that is restarting or unreachable: publishing again later may succeed (OSError: refused, reset, timeout)
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
log = logging.getLogger(__name__)
FORGET_CONSUMER_IDLE_MS = 3_600_000  # live consumers (and reclaimers) call Redis every few seconds at most
LAG_READ_TIMEOUT_S = 5.0  # one reading of every group's lag; longer (a broker that hangs) and it is retried later
# (topic, group) → (messages not yet delivered to the group, or None where the broker cannot tell; delivered and
# not yet acknowledged / committed)
LagReadings = dict[tuple[str, str], tuple[int | None, int]]


class FixedStreamSub(StreamSub):
    """A stream subscription whose name never gets a prefix (the bus sets none): FastStream's subscriber asks
    for its prefixed copy of it twice per read, and `StreamSub.add_prefix` deep-copies it each time."""

    def add_prefix(self, prefix: str) -> Self:
        return self if not prefix else super().add_prefix(prefix)


async def raw_redis_batch_parser(message: Any, original: Any) -> Any:
    """A Redis batch whose body is each entry's raw payload (and whose batch headers are each entry's
    headers), as on Kafka and NATS: the bus checks each payload's size, validates it, and dead-letters alone
    one that is not valid UTF-8 or JSON. FastStream's own batch parse would decode every body's JSON,
    re-encode the list and decode it again (and fail the whole batch on one non-UTF-8 entry): it builds only
    the message (ids, ack) here."""
    parsed = await original({**message, "data": []})
    entries = [_redis_entry(entry) for entry in message["data"]]
    parsed.body = [body for body, _ in entries]
    parsed.batch_headers = [headers for _, headers in entries]
    return parsed


def _redis_entry(entry: Any) -> tuple[bytes, dict[str, Any]]:
    raw = entry.get(b"__data__", entry) if isinstance(entry, dict) else entry
    if isinstance(raw, dict):  # an entry written by something else than a bus: its fields, as JSON
        raw = json.dumps({_text(k): _text(v) for k, v in raw.items()}).encode()
    return envelope.parse(bytes(raw))


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class RawBatch:
    """A batch as the bus dispatches it: each message's raw body and its headers (trace context), in order."""

    bodies: list[Any]
    headers: Sequence[Mapping[str, Any] | None] | None
    entry_ids: Sequence[bytes] = ()  # Redis: the stream entries, acknowledged by the bus after publishing


async def raw_batch_decoder(message: Any, original: Any) -> RawBatch:
    """Hand the batch's raw bodies to the bus unchanged (it validates each and dead-letters the bad), with
    their headers."""
    bodies = message.body if isinstance(message.body, list) else await original(message)
    raw = message.raw_message
    entry_ids = raw.get("message_ids", ()) if isinstance(raw, dict) else ()
    return RawBatch(bodies, message.batch_headers, entry_ids)


async def _forget_idle_consumers(redis: Any, stream: str, group: str) -> None:
    """Drop a group's consumers that hold no pending entry and did nothing for an hour (gone instances)."""
    for consumer in await redis.xinfo_consumers(stream, group):
        if consumer["pending"] == 0 and consumer["idle"] > FORGET_CONSUMER_IDLE_MS:
            await redis.xgroup_delconsumer(stream, group, consumer["name"])


Item = tuple[str, bytes, str, Mapping[str, str] | None]  # topic, payload, key, headers


def _with_content_type(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A message's headers on the wire: its own (trace context), and the JSON content type."""
    return {**JSON, **headers} if headers else JSON


class RedisSender:
    """Publishing to Redis Streams, coalesced: what every task of one event-loop turn publishes (a gateway's
    concurrent requests, a voter's batch) and the acknowledgements of the batches those outputs came from
    leave in one atomic script call (all or nothing, as MULTI/EXEC), one round trip, once that turn ends:
    outputs wait for no timer. An entry is acknowledged only with, never before, what its handling published
    (and a batch that published nothing, a little later: see `send`).

    Each entry is FastStream's binary envelope (its subscribers read it as if FastStream had published it),
    written by `envelope` and added with XADD inside the script: FastStream's per-message publish path (command
    objects, middlewares, a round trip each) cost more than the rest of a gateway request, and a MULTI/EXEC
    pipeline of n entries still cost ~22 µs of client CPU per entry (against ~6 µs now). On this kind of box a
    round trip to Redis is ~0.1-0.2 ms of CPU (system calls on both sides), the bulk of what a small batch costs."""

    def __init__(self, broker: RedisBroker, retrying: Callable[[Callable[[], Awaitable[None]], str], Awaitable[None]]):
        self.broker = broker
        self.retrying = retrying
        self._items: list[Item] = []
        self._acks: list[Ack] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._late: list[Ack] = []  # acknowledgements that published nothing, sent with the next transaction
        self._late_timer: asyncio.TimerHandle | None = None
        self._ids = envelope.CorrelationIds()
        self._script: Any = None

    async def send(self, items: Sequence[Item], ack: Ack | None = None) -> None:
        """Publish `items` (then acknowledge `ack`); returns once done, or raises what the transaction raised.

        An acknowledgement without items (a batch whose handling published nothing: the arbiter's texts, votes
        that complete no text) does not wait: it goes out with the next transaction, or `ACK_DELAY_S` later.
        Sent late it costs no round trip of its own; lost (a crash first, Redis down) its entries are
        delivered again after `redis_claim_idle_ms`, and handlers are idempotent."""
        loop = asyncio.get_running_loop()
        if not items:
            if ack is not None:
                self._late.append(ack)
                if self._late_timer is None and not self._waiters:
                    self._late_timer = loop.call_later(ACK_DELAY_S, self._flush)
            return
        if not self._waiters:
            loop.call_soon(self._flush)
        self._items += items
        if ack is not None:
            self._acks.append(ack)
        waiter = loop.create_future()
        self._waiters.append(waiter)
        await waiter  # each caller its own: one cancelled meanwhile cancels nobody else's

    def _flush(self) -> None:
        if self._late_timer is not None:
            self._late_timer.cancel()
            self._late_timer = None
        items, acks, waiters = self._items, self._late + self._acks, self._waiters
        self._items, self._acks, self._waiters, self._late = [], [], [], []
        if items or acks:
            task = asyncio.get_running_loop().create_task(self._send(items, acks, waiters))
            _SENDING.add(task)
            task.add_done_callback(_SENDING.discard)

    async def drain(self) -> None:
        """Send what waits (late acknowledgements) and wait for every transaction in flight."""
        self._flush()
        while _SENDING:
            await asyncio.gather(*_SENDING, return_exceptions=True)

    async def _send(self, items: list[Item], acks: list[Ack], waiters: list[asyncio.Future[None]]) -> None:
        try:
            args = self._script_args(items, acks)
            await self.retrying(lambda: self._transaction(args), items[0][0] if items else acks[0].topic)
        except asyncio.CancelledError:  # the loop is closing
            for waiter in waiters:
                waiter.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every waiter learns what happened to its messages
            if not waiters:  # late acknowledgements only: their entries will be delivered again
                log.warning("acknowledging %d batch(es) failed (%s); they will be redelivered", len(acks), exc)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _script_args(self, items: list[Item], acks: list[Ack]) -> list[bytes]:
        """`_PUBLISH`'s arguments, all bytes (redis-py then packs each without its type checks)."""
        args = [_MAXLEN, str(len(items)).encode()]
        for topic, payload, _, headers in items:
            args += (topic.encode(), envelope.encode(payload, self._ids.next(), _with_content_type(headers)))
        for ack in acks:
            ids = [i if isinstance(i, bytes) else i.encode() for i in ack.ids]
            for start in range(0, len(ids), _ACK_CHUNK):
                chunk = ids[start : start + _ACK_CHUNK]
                args += (ack.topic.encode(), ack.group.encode(), str(len(chunk)).encode(), *chunk)
        return args

    async def _transaction(self, args: list[bytes]) -> None:
        if self._script is None:
            client: Any = self.broker._connection  # noqa: SLF001 - the broker's own client (connected by now)
            self._script = client.register_script(_PUBLISH)
        await self._script(args=args)


# One script call publishes and acknowledges (atomic, like MULTI/EXEC): one command to pack and one reply to read,
# where a transaction of n entries was n + 2 commands and n + 2 replies, most of a vote's publishing cost.
# ARGV: maxlen, n, (stream, envelope) * n, then (stream, group, k, id * k) per acknowledgement
_PUBLISH = f"""
local maxlen, n = ARGV[1], tonumber(ARGV[2])
local i = 3
for _ = 1, n do
  redis.call('XADD', ARGV[i], 'MAXLEN', '~', maxlen, '*', '{DATA_KEY}', ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  local k = tonumber(ARGV[i + 2])
  redis.call('XACK', ARGV[i], ARGV[i + 1], unpack(ARGV, i + 3, i + 2 + k))
  i = i + 3 + k
end
return n
"""
_MAXLEN = str(STREAM_MAXLEN).encode()
_ACK_CHUNK = 1_000  # ids per XACK: Lua's unpack has a stack limit


ACK_DELAY_S = 0.05  # the longest an acknowledgement without outputs waits for a transaction to ride with
_SENDING: set[asyncio.Task[None]] = set()  # flushes in progress (a task needs a reference until it ends)


def nats_durable(group: str, topic: str) -> str:
    """The JetStream durable consumer of a work group on one topic (a durable name cannot hold a dot).

    One per (group, topic): a durable consumer has one filter subject, so a group that reads two topics (the
    arbiter: texts and votes) under one name had its second subscription bound to the first one's consumer and
    handed the other topic's messages (caught by the signature check, which covers the topic)."""
    return f"{group}--{topic}".replace(".", "_")


def _export_lag(readings: LagReadings, scope: str = "group") -> None:
    """Set the gauges `flockwatch_consumer_lag` / `flockwatch_consumer_pending` (labels: topic, group, scope:
    `group` where the reading is the whole group's, alike in each instance (Redis, NATS); `instance` where it is
    this instance's partitions only (Kafka), so that dashboards take the max of the one and the sum of the other)."""
    for (topic, group), (lag, pending) in readings.items():
        if lag is not None:
            telemetry.CONSUMER_LAG.labels(topic, group, scope).set(lag)
        telemetry.CONSUMER_PENDING.labels(topic, group, scope).set(pending)


async def _kafka_partition_lag(consumer: Any, topic: str) -> tuple[int, int]:
    """(records not yet handed to the handler, handed over and not committed), summed over the partitions of
    `topic` assigned to this consumer (an `AIOKafkaConsumer`; none assigned: (0, 0)); the group's other members
    report theirs.

    A partition's end is the larger of the broker's end offset (ListOffsets) and the high watermark of the last
    fetch: the watermark alone goes stale while fetched records wait for a busy handler (no new fetch), and Tansu
    answers ListOffsets with the number of record batches, below the real end. With nothing committed yet the
    group started at the partition's beginning (work groups read from the earliest offset)."""
    partitions = sorted(tp for tp in consumer.assignment() if tp.topic == topic)
    if not partitions:
        return 0, 0
    ends = await consumer.end_offsets(partitions)
    committed = await asyncio.gather(*(consumer.committed(tp) for tp in partitions))
    positions = await asyncio.gather(*(consumer.position(tp) for tp in partitions))
    unset = [tp for tp, offset in zip(partitions, committed, strict=True) if offset is None]
    starts = await consumer.beginning_offsets(unset) if unset else {}
    lag = pending = 0
    for tp, offset, position in zip(partitions, committed, positions, strict=True):
        end = max(ends.get(tp) or 0, consumer.highwater(tp) or 0)
        done = starts.get(tp, 0) if offset is None else offset
        lag += max(0, end - position)
        pending += max(0, position - done)
    return lag, pending


def kafka_bootstrap(url: str) -> list[str]:
    """`kafka://h1:9092,h2:9092` → ["h1:9092", "h2:9092"]."""
    return [h for h in url.split("://", 1)[1].strip("/").split(",") if h]


class FastStreamBus(Bus):
    """Routes become FastStream batch subscribers; handler code never knows which broker runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        scheme, url = self.settings.bus_scheme, self.settings.bus_url
        if scheme == "kafka":
            self.broker: KafkaBroker | RedisBroker | NatsBroker = KafkaBroker(
                kafka_bootstrap(url),
                client_id=f"flockwatch-{self.settings.instance_id}",
                security=kafka_config.security(self.settings),
                **kafka_config.PRODUCER,
                **QUIET,
            )
        elif scheme == "redis":
            self.broker = RedisBroker(url, **QUIET)
        else:
            patch_fetch_timeouts()  # else a fetch timeout can stall a partial batch for the 30 s ack wait
            self.broker = NatsBroker(url, **QUIET)
        self._started = False
        self._bound = 0
        self._lag_task: asyncio.Task[None] | None = None
        self._lag_redis: Any = None
        self._kafka_subs: list[tuple[str, str, Any]] = []  # work groups' (topic, group, FastStream subscriber)
        self._publishing = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        self._redis_sender = RedisSender(self.broker, self._retrying) if isinstance(self.broker, RedisBroker) else None

    def _register(self, route: Route[Any]) -> None:
        group = self.group_of(route)

        async def consume(batch: RawBatch) -> None:
            # Redis entries are acknowledged by the bus, in the pipeline that publishes the batch's outputs
            ack = Ack(route.topic, group, batch.entry_ids) if batch.entry_ids else None
            await self.dispatch(route, batch.bodies, batch.headers, ack)

        if isinstance(self.broker, KafkaBroker):
            sub = self.broker.subscriber(
                kafka_config.topic(route.topic),
                **kafka_config.consumer_options(route, group, self.settings),
                decoder=raw_batch_decoder,
            )
            if not route.broadcast:
                self._kafka_subs.append((route.topic, group, sub))
        elif isinstance(self.broker, RedisBroker):
            sub = self.broker.subscriber(
                stream=FixedStreamSub(
                    route.topic,
                    group=group,
                    consumer=self.settings.instance_id,
                    batch=True,
                    max_records=route.max_batch,
                    polling_interval=REDIS_BLOCK_MS,
                ),
                parser=raw_redis_batch_parser,
                decoder=raw_batch_decoder,
                ack_policy=AckPolicy.MANUAL,  # the bus acknowledges, after publishing (see `RedisSender`)
            )
        else:
            sub = self.broker.subscriber(
                route.topic,
                stream=NATS_STREAM,
                durable=None if route.broadcast else nats_durable(group, route.topic),
                pull_sub=PullSub(batch_size=route.max_batch, timeout=max(0.001, route.max_wait_ms / 1000), batch=True),
                # a batch that failed for a transient reason (bus.TRANSIENT) is redelivered, as on Kafka; poison is
                # dead-lettered inside `dispatch` and acknowledged
                ack_policy=AckPolicy.NACK_ON_ERROR,
                decoder=raw_batch_decoder,
            )
        sub(consume)
        if isinstance(self.broker, RedisBroker) and not route.broadcast and self.settings.redis_claim_idle_ms:
            self._redis_reclaimer(route, group)(consume)

    def _redis_reclaimer(self, route: Route[Any], group: str) -> Any:
        """A second consumer of a Redis work group that takes over entries read but not acknowledged for
        `redis_claim_idle_ms` (XAUTOCLAIM): a consumer killed mid-batch, or a batch whose handling failed, would
        otherwise keep them pending for good (reading with `>` never delivers an entry twice)."""
        assert isinstance(self.broker, RedisBroker)
        idle = self.settings.redis_claim_idle_ms
        return self.broker.subscriber(
            stream=FixedStreamSub(
                route.topic,
                group=group,
                consumer=f"{self.settings.instance_id}.reclaim",
                batch=True,
                min_idle_time=idle,
                polling_interval=max(50, min(idle // 4, 5_000)),  # the pause after a scan of the pending list
            ),
            parser=raw_redis_batch_parser,
            decoder=raw_batch_decoder,
            ack_policy=AckPolicy.MANUAL,
        )

    async def publish_many(
        self, items: Sequence[tuple[str, bytes, str, Mapping[str, str] | None]], ack: Ack | None = None
    ) -> None:
        if self._redis_sender is None:
            await super().publish_many(items)
        else:
            await self._redis_sender.send(items, ack)

    async def publish_raw(self, topic: str, payload: bytes, key: str, headers: Mapping[str, str] | None = None) -> None:
        if self._redis_sender is not None:
            await self._redis_sender.send([(topic, payload, key, headers)])
            return
        async with self._publishing:
            merged = _with_content_type(headers)
            await self._retrying(lambda: self._publish(topic, payload, key, merged), topic)

    async def _retrying(self, send: Callable[[], Awaitable[None]], topic: str) -> None:
        """Send, again with backoff while the broker is unreachable, for up to `publish_retry_s`."""
        try:
            await send()  # the common case, without building the retry machinery on every publish
            return
        except UNREACHABLE as exc:
            log.warning("publish to %s failed (%s); retrying with backoff", topic, exc)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(UNREACHABLE),
                wait=wait_exponential_jitter(initial=0.05, max=2.0),
                stop=stop_after_delay(self.settings.publish_retry_s),
                reraise=True,
            ):
                with attempt:
                    await send()
        except UNREACHABLE as exc:
            raise BusUnavailable(f"cannot publish to {topic} for {self.settings.publish_retry_s} s: {exc}") from exc

    async def _publish(self, topic: str, payload: bytes, key: str, headers: dict[str, str]) -> None:
        if isinstance(self.broker, KafkaBroker):
            await self.broker.publish(payload, topic=topic, key=key.encode(), headers=headers)
        elif isinstance(self.broker, RedisBroker):
            await self.broker.publish(payload, stream=topic, maxlen=STREAM_MAXLEN, headers=headers)
        else:
            # JetStream waits for the server's ack; nats-py's 0.5 s default timed out on a loaded 2-core box
            await self.broker.publish(
                payload, subject=topic, stream=NATS_STREAM.name, headers=headers, timeout=NATS_ACK_TIMEOUT_S
            )

    async def _create_redis_groups(self) -> None:
        # A new work group starts at the stream's beginning, so nothing published before the first
        # instance came up is lost; a broadcast group only wants what comes next. FastStream would
        # create groups at "$", so create them first.
        redis: Any = self.broker._connection  # noqa: SLF001 - the broker's own client
        for route in self.routes:
            try:
                await redis.xgroup_create(
                    route.topic, self.group_of(route), id="$" if route.broadcast else "0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                if not route.broadcast:  # an instance that restarts under a new name leaves its old name behind
                    await _forget_idle_consumers(redis, route.topic, self.group_of(route))

    def bind(self) -> None:
        """Register every route as a FastStream subscriber (once); `start` does it, tests may call it first."""
        for route in self.routes[self._bound :]:
            self._register(route)
        self._bound = len(self.routes)

    async def start(self) -> None:
        self.bind()
        if isinstance(self.broker, RedisBroker):
            await self.broker.connect()
            await self._create_redis_groups()
        if isinstance(self.broker, KafkaBroker):
            await self._start_kafka(self.broker)
        else:
            await self.broker.start()
        self._started = True
        if self.settings.lag_interval_s > 0 and any(not route.broadcast for route in self.routes):
            self._lag_task = asyncio.get_running_loop().create_task(self._watch_lag())

    @staticmethod
    async def _start_kafka(broker: KafkaBroker) -> None:
        # What KafkaBroker.start does, but with the subscribers started together: each one's start waits
        # until its consumer group has assigned it partitions, which takes a rebalance round (seconds).
        await broker.connect()
        await asyncio.gather(*(sub.start() for sub in broker.subscribers))
        for pub in broker.publishers:
            await pub.start()
        broker.running = True

    async def consumer_lag(self) -> LagReadings:
        """Each work group's (topic, group) → (lag, pending) on this transport (see `redis_lag`, `kafka_lag`,
        `nats_lag`); also the gauges `flockwatch_consumer_lag` / `_pending`. Broadcast groups (one per instance)
        are left out."""
        if isinstance(self.broker, RedisBroker):
            return await self.redis_lag()
        if isinstance(self.broker, KafkaBroker):
            return await self.kafka_lag()
        return await self.nats_lag()

    async def redis_lag(self) -> LagReadings:
        """(topic, group) → (entries not yet read, or None where Redis cannot tell; read and not acknowledged)
        for this process's work groups; also the gauges `flockwatch_consumer_lag` / `_pending`."""
        if self._lag_redis is None:  # a client of its own: the broker's pool is busy with blocking reads
            import redis.asyncio as aioredis

            self._lag_redis = aioredis.from_url(self.settings.bus_url, socket_timeout=2, socket_connect_timeout=2)
        redis: Any = self._lag_redis
        out: LagReadings = {}
        for route in self.routes:
            if route.broadcast:
                continue
            group = self.group_of(route)
            for info in await redis.xinfo_groups(route.topic):
                name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
                if name == group:
                    lag = info.get("lag")
                    out[(route.topic, group)] = (None if lag is None else int(lag), int(info["pending"]))
        _export_lag(out)
        return out

    async def kafka_lag(self) -> LagReadings:
        """(topic, group) → (records of this process's partitions not yet handed to the handler: end offset −
        position; handed over and not committed: position − committed), each summed over the partitions this
        process is assigned (see `_kafka_partition_lag`); also the gauges. Each member of a group reports its own
        partitions: the group's lag is the sum over its instances. A subscriber not started is left out."""
        out: LagReadings = {}
        for topic, group, sub in self._kafka_subs:
            consumer = sub.consumer  # FastStream's public attribute: its AIOKafkaConsumer while started
            if consumer is not None:
                out[(topic, group)] = await _kafka_partition_lag(consumer, topic)
        _export_lag(out, scope="instance")
        return out

    async def nats_lag(self) -> LagReadings:
        """(topic, group) → (messages of the stream the group's durable consumer has not delivered yet:
        `num_pending`; delivered and not acknowledged: `num_ack_pending`), from the server's consumer info; the
        same for every instance of the group. Also the gauges."""
        assert isinstance(self.broker, NatsBroker)
        js = self.broker.connection.jetstream(timeout=LAG_READ_TIMEOUT_S)
        out: LagReadings = {}
        for route in self.routes:
            if route.broadcast:  # an ephemeral consumer per instance, without a name to ask for
                continue
            group = self.group_of(route)
            info = await js.consumer_info(NATS_STREAM.name, nats_durable(group, route.topic))
            out[(route.topic, group)] = (int(info.num_pending or 0), int(info.num_ack_pending or 0))
        _export_lag(out)
        return out

    async def _watch_lag(self) -> None:
        """Read the lag every `lag_interval_s` until cancelled (`stop`). A reading that fails or hangs (a broker
        down, a rebalance under way, a consumer not created yet) is logged, at warning the first time in a row,
        and tried again next interval: it never stops the watcher nor holds anything else up."""
        failing = False
        while True:
            try:
                await asyncio.wait_for(self.consumer_lag(), LAG_READ_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - whatever the client raised: the next reading may work
                (log.debug if failing else log.warning)(
                    "bus: consumer lag not read (%s: %s); trying again every %s s",
                    type(exc).__name__,
                    exc,
                    self.settings.lag_interval_s,
                )
                failing = True
            else:
                if failing:
                    log.info("bus: consumer lag read again")
                failing = False
            await asyncio.sleep(self.settings.lag_interval_s)

    async def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None
        if self._lag_redis is not None:
            await self._lag_redis.aclose()
            self._lag_redis = None
        if self._started:
            if self._redis_sender is not None:
                await self._redis_sender.drain()
            await self.broker.stop()
            self._started = False
