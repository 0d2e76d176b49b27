"""The bus over FastStream brokers: Kafka (production), Redis Streams and NATS JetStream."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.redis import RedisBroker, StreamSub
from flockwatch.common import kafka_config
from flockwatch.common.bus import Bus, Route
from redis.exceptions import ResponseError

# FastStream logs every message at `log_level`; DEBUG keeps the hot path quiet, errors still show.
QUIET: dict[str, Any] = {"logger": logging.getLogger("faststream"), "log_level": logging.DEBUG}
JSON = {"content-type": "application/json"}
PUBLISH_CONCURRENCY = 32  # in-flight publishes per process: pipelined, within the connection pool
STREAM_MAXLEN = 1_000_000  # Redis streams are capped (approximately) so memory stays bounded
NATS_ACK_TIMEOUT_S = 5.0
NATS_STREAM = JStream("flockwatch", subjects=["flockwatch.>"], declare=True)


async def tolerant_redis_batch_parser(message: Any, original: Any) -> Any:
    """FastStream's Redis batch parser fails the whole batch on one non-UTF-8 entry; replace such
    entries with their text (invalid bytes replaced) so that only they go to the dead-letter topic."""
    try:
        return await original(message)
    except UnicodeDecodeError:
        entries = []
        for entry in message["data"]:
            try:
                await original({**message, "data": [entry]})
                entries.append(entry)
            except UnicodeDecodeError:
                raw = entry.get(b"__data__", b"") if isinstance(entry, dict) else bytes(entry)
                entries.append({b"__data__": json.dumps(raw.decode("utf-8", errors="replace")).encode()})
        return await original({**message, "data": entries})


async def raw_batch_decoder(message: Any, original: Any) -> Any:
    """Hand the batch's raw bodies to the bus unchanged: it validates each and dead-letters the bad."""
    return message.body if isinstance(message.body, list) else await original(message)


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
        async def consume(body: list[Any]) -> None:
            await self.dispatch(route, body)

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
                    polling_interval=max(1, route.max_wait_ms),
                ),
                parser=tolerant_redis_batch_parser,
            )
        else:
            sub = self.broker.subscriber(
                route.topic,
                stream=NATS_STREAM,
                durable=None if route.broadcast else group.replace(".", "_"),
                pull_sub=PullSub(batch_size=route.max_batch, timeout=max(0.001, route.max_wait_ms / 1000), batch=True),
                ack_policy=AckPolicy.ACK,
                decoder=raw_batch_decoder,
            )
        sub(consume)

    async def publish_raw(self, topic: str, payload: bytes, key: str) -> None:
        async with self._publishing:
            await self._publish(topic, payload, key)

    async def _publish(self, topic: str, payload: bytes, key: str) -> None:
        if isinstance(self.broker, KafkaBroker):
            await self.broker.publish(payload, topic=topic, key=key.encode(), headers=JSON)
        elif isinstance(self.broker, RedisBroker):
            await self.broker.publish(payload, stream=topic, maxlen=STREAM_MAXLEN, headers=JSON)
        else:
            # JetStream waits for the server's ack; nats-py's 0.5 s default timed out on a loaded 2-core box
            await self.broker.publish(
                payload, subject=topic, stream=NATS_STREAM.name, headers=JSON, timeout=NATS_ACK_TIMEOUT_S
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
