"""The bus over FastStream brokers: Kafka (production), Redis Streams and NATS JetStream."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any

from faststream import AckPolicy, Context
from faststream.kafka import KafkaBroker
from faststream.message import StreamMessage
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.parser import BinaryMessageFormatV1
from flockwatch.common import kafka_config
from flockwatch.common.bus import Bus, BusUnavailable, Route
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

# FastStream logs every message at `log_level`; DEBUG keeps the hot path quiet, errors still show.
QUIET: dict[str, Any] = {"logger": logging.getLogger("faststream"), "log_level": logging.DEBUG}
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
    body, headers = BinaryMessageFormatV1.parse(bytes(raw))
    return bytes(body), headers


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


async def raw_batch_decoder(message: Any, original: Any) -> Any:
    """Hand the batch's raw bodies to the bus unchanged: it validates each and dead-letters the bad."""
    return message.body if isinstance(message.body, list) else await original(message)


def _warn_once(state: RetryCallState) -> None:
    if state.attempt_number == 1 and state.outcome is not None:
        log.warning("publish failed (%s); retrying with backoff", state.outcome.exception())


async def _forget_idle_consumers(redis: Any, stream: str, group: str) -> None:
    """Drop a group's consumers that hold no pending entry and did nothing for an hour (gone instances)."""
    for consumer in await redis.xinfo_consumers(stream, group):
        if consumer["pending"] == 0 and consumer["idle"] > FORGET_CONSUMER_IDLE_MS:
            await redis.xgroup_delconsumer(stream, group, consumer["name"])


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
                **kafka_config.PRODUCER,
                **QUIET,
            )
        elif scheme == "redis":
            self.broker = RedisBroker(url, **QUIET)
        else:
            self.broker = NatsBroker(url, **QUIET)
        self._started = False
        self._bound = 0
        self._publishing = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    def _register(self, route: Route[Any]) -> None:
        async def consume(body: list[Any], message: Annotated[StreamMessage[Any], Context("message")]) -> None:
            # each message's own headers (its trace context), in the batch's order
            await self.dispatch(route, body, message.batch_headers)

        group = self.group_of(route)
        if isinstance(self.broker, KafkaBroker):
            sub = self.broker.subscriber(
                kafka_config.topic(route.topic),
                **kafka_config.consumer_options(route, group, self.settings),
                decoder=raw_batch_decoder,
            )
        elif isinstance(self.broker, RedisBroker):
            sub = self.broker.subscriber(
                stream=StreamSub(
                    route.topic,
                    group=group,
                    consumer=self.settings.instance_id,
                    batch=True,
                    max_records=route.max_batch,
                    polling_interval=REDIS_BLOCK_MS,
                ),
                parser=raw_redis_batch_parser,
                decoder=raw_batch_decoder,
            )
        else:
            sub = self.broker.subscriber(
                route.topic,
                stream=NATS_STREAM,
                durable=None if route.broadcast else group.replace(".", "_"),
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
            stream=StreamSub(
                route.topic,
                group=group,
                consumer=f"{self.settings.instance_id}.reclaim",
                batch=True,
                min_idle_time=idle,
                polling_interval=max(50, min(idle // 4, 5_000)),  # the pause after a scan of the pending list
            ),
            parser=raw_redis_batch_parser,
            decoder=raw_batch_decoder,
        )

    async def publish_many(self, items: Sequence[tuple[str, bytes, str, Mapping[str, str] | None]]) -> None:
        if not isinstance(self.broker, RedisBroker) or len(items) < 2:
            await super().publish_many(items)
            return
        broker: RedisBroker = self.broker

        async def send() -> None:
            # one round trip for the whole batch: FastStream encodes each message into a pipeline
            client: Any = broker._connection  # noqa: SLF001 - the broker's own client
            async with client.pipeline(transaction=False) as pipe:
                for topic, payload, _, headers in items:
                    merged = {**JSON, **headers} if headers else JSON
                    await broker.publish(payload, stream=topic, maxlen=STREAM_MAXLEN, headers=merged, pipeline=pipe)
                await pipe.execute()

        await self._retrying(send, items[0][0])

    async def publish_raw(self, topic: str, payload: bytes, key: str, headers: Mapping[str, str] | None = None) -> None:
        async with self._publishing:
            merged = {**JSON, **headers} if headers else JSON
            await self._retrying(lambda: self._publish(topic, payload, key, merged), topic)

    async def _retrying(self, send: Callable[[], Awaitable[None]], topic: str) -> None:
        """Send, again with backoff while the broker is unreachable, for up to `publish_retry_s`."""
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(UNREACHABLE),
                wait=wait_exponential_jitter(initial=0.05, max=2.0),
                stop=stop_after_delay(self.settings.publish_retry_s),
                before_sleep=_warn_once,
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
        redis = self.broker._connection  # noqa: SLF001 - the broker's own client
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

    @staticmethod
    async def _start_kafka(broker: KafkaBroker) -> None:
        # What KafkaBroker.start does, but with the subscribers started together: each one's start waits
        # until its consumer group has assigned it partitions, which takes a rebalance round (seconds).
        await broker.connect()
        await asyncio.gather(*(sub.start() for sub in broker.subscribers))
        for pub in broker.publishers:
            await pub.start()
        broker.running = True

    async def stop(self) -> None:
        if self._started:
            await self.broker.stop()
            self._started = False
