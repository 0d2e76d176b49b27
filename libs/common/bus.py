"""The bus: one interface over FastStream brokers (Kafka, Redis Streams, NATS JetStream) and in-process.

Handlers are plain async functions of a *list* of validated messages that return the messages to publish.
Batching, decoding, dead-lettering, redelivery dedupe and pipelined publishing live here, once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, TypeVar

from asyncpg import CannotConnectNowError, PostgresConnectionError
from flockwatch.common import signing, telemetry, topics, tracing
from flockwatch.common.events import DeadLetter, Event
from flockwatch.common.settings import CommonSettings
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)
Handler = Callable[[list[E]], Awaitable[Sequence[Event]]]
MAX_DEAD_PAYLOAD = 256 * 1024  # bytes of the payload as JSON in the dead letter (escapes included)


class BusUnavailable(RuntimeError):
    """The broker could not be reached to publish, even after retrying with backoff (`publish_retry_s`)."""


# The infrastructure a handler talks to is down (the broker, Redis, Postgres): its batch is not poison. It is
# not dead-lettered but handled again later (the broker redelivers it; the memory bus retries it).
TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    BusUnavailable,
    RedisConnectionError,
    RedisTimeoutError,
    PostgresConnectionError,
    CannotConnectNowError,
)
TRANSIENT_PAUSE_S = 1.0  # before a failed batch is given back: redeliveries must not spin while a service is down


@dataclass(frozen=True)
class Ack:
    """A consumed batch's acknowledgement, for a transport that sends it itself after the batch's outputs
    (Redis Streams: XACK of these entry ids in the outputs' pipeline, one round trip for both)."""

    topic: str
    group: str
    ids: Sequence[bytes | str]


@dataclass
class Route(Generic[E]):
    """A subscription: messages of `model` on `topic`, for consumer `group`, handled in batches."""

    topic: str
    model: type[E]
    handler: Handler[E]
    group: str
    broadcast: bool = False  # every instance gets every message (its own group)
    max_batch: int = 256
    max_wait_ms: int = 3
    # called with the handler's outputs once they are published (and the batch acknowledged): what must
    # happen only after publishing, without a round trip of its own in the handler
    published: Callable[[Sequence[Event]], Awaitable[None]] | None = None
    # a route shared by co-hosted services (`Bus.cohost`): each of theirs runs on every batch of this one
    parts: list[Route[E]] = field(default_factory=list)


class SeenIds:
    """A bounded memory of processed message ids (per consumer group) to drop redeliveries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._ids

    def add(self, key: str) -> None:
        """Remember an id, forgetting the oldest beyond the window."""
        if self.size:
            self._ids[key] = None
            if len(self._ids) > self.size:
                self._ids.popitem(last=False)


class Linger:
    """How long a consumer waits, after a batch, before reading the next, so that under load batches grow and
    their fixed costs (a read, a model call, a publish, an ack) are shared by more texts.

    It waits `max_wait_s` only while texts come fast enough that `EXPECTED` of them should arrive during the
    wait, and the last batch was small (fewer than `ENOUGH` texts, not full): at low load a lone text goes
    through at once, and a large batch (a `POST /predict/batch`) is not held up. With one text expected the
    waits switched on and off for a client that sends its next text when the last is answered (its rate is
    one over the latency, near one per wait), which raised the low-load p95 by half. It counts texts (message
    keys), not messages: the votes on one text come from several voters in several messages, and at low load
    they must not look like load."""

    SMOOTHING = 0.2  # weight of the newest batch in the rate estimate
    ENOUGH = 16  # texts in a batch that share its fixed costs well: waiting for more only adds latency
    EXPECTED = 2.0  # texts that must be expected to arrive during a wait for it to be worth waiting

    def __init__(self, max_wait_s: float, memory: int = 4096) -> None:
        self.max_wait_s = max_wait_s
        self.memory = memory
        self.rate = 0.0  # new keys per second, smoothed over batches
        self._last = time.monotonic()
        self._recent: OrderedDict[str, None] = OrderedDict()

    def after(self, keys: Sequence[str], full: bool) -> float:
        """Seconds to wait after a batch with these keys (`full`: it had as many messages as a batch may)."""
        now = time.monotonic()
        new = 0
        for key in keys:
            if key not in self._recent:
                new += 1
                self._recent[key] = None
        while len(self._recent) > self.memory:
            self._recent.popitem(last=False)
        elapsed, self._last = max(now - self._last, 1e-3), now
        self.rate += self.SMOOTHING * (new / elapsed - self.rate)
        if full or new >= self.ENOUGH or self.rate * self.max_wait_s < self.EXPECTED:
            return 0.0
        return self.max_wait_s


def _as_text(raw: Any) -> tuple[str, int]:
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        return data.decode("utf-8", errors="replace"), len(data)
    if isinstance(raw, str):
        return raw, len(raw.encode("utf-8", errors="replace"))
    text = json.dumps(raw, default=str)
    return text, len(text.encode())


class Bus(ABC):
    """Publish events; run batch handlers for routes. Concrete buses differ only in transport."""

    # under load, wait after a small batch for the next to fill (`Linger`): on a broker every batch costs reads,
    # a publish and an acknowledgement, round trips that a larger batch shares
    lingers = True

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self._key = signing.key_bytes(settings.bus_key)
        if self._key is None:
            signing.warn_unsigned(settings.bus_scheme)
        self.routes: list[Route[Any]] = []
        self._seen: dict[str, SeenIds] = {}
        self._lingers: dict[str, Linger] = {}

    def subscribe(
        self,
        topic: str,
        model: type[E],
        group: str,
        *,
        broadcast: bool = False,
        published: Callable[[Sequence[Event]], Awaitable[None]] | None = None,
    ) -> Callable[[Handler[E]], Handler[E]]:
        """Decorator registering a batch handler for `topic` (`published`: see `Route.published`)."""

        def register(handler: Handler[E]) -> Handler[E]:
            self.routes.append(
                Route(
                    topic,
                    model,
                    handler,
                    group,
                    broadcast,
                    self.settings.batch_max,
                    self.settings.batch_wait_ms,
                    published,
                )
            )
            return handler

        return register

    def cohost(self) -> None:
        """Services hosted in one process share their subscriptions: the routes of one topic and message type
        (work groups, without a `published` hook) become one route, under the group named by joining theirs
        with "+" (e.g. `classical_voter+regex_voter+ws_voter`), which runs each service's handler on the same
        batch, concurrently, and publishes all their outputs together.

        Each message is then read, decoded and acknowledged once instead of once per service, and their outputs
        (three voters' votes on a text) leave in one transaction: on a broker, and above all at low load, that
        fixed cost per message is most of what a cheap voter spends. The handlers are unchanged, and so is how
        each one's failures are handled: a message that breaks one handler is dead-lettered for that handler
        alone (the others' outputs for it are published); a transient failure of any gives the batch back to
        all (redelivered, each service's outputs carry the same message ids as before). Call before the bus
        starts; a fused group is a new consumer group (it starts at the stream's beginning)."""
        shared: dict[tuple[str, type[Any]], list[Route[Any]]] = {}
        for route in self.routes:
            if not route.broadcast and route.published is None and not route.parts:
                shared.setdefault((route.topic, route.model), []).append(route)
        for (topic, model), routes in shared.items():
            if len(routes) > 1:
                self.routes = [r for r in self.routes if r not in routes]
                group = "+".join(sorted(route.group for route in routes))
                first = routes[0]
                self.routes.append(
                    Route(topic, model, first.handler, group, False, first.max_batch, first.max_wait_ms, parts=routes)
                )

    async def publish(self, events: Sequence[Event], *, ack: Ack | None = None) -> None:
        """Publish events, each to its type's topic, keyed by its text id; concurrently (pipelined). `ack`, a
        consumed batch's acknowledgement, goes after them (Redis: in the same pipeline)."""
        if not events:
            if ack is not None:
                await self.publish_many([], ack=ack)
            return
        if tracing.ENABLED:  # a send span per event; its context travels in the message's headers
            with tracing.sending(events, self.settings.bus_scheme) as headers:
                await self.publish_many(
                    [self._item(e, h) for e, h in zip(events, headers, strict=True)],
                    ack=ack,
                )
        else:
            await self.publish_many([self._item(e, None) for e in events], ack=ack)
        for topic, n in Counter(e.TOPIC for e in events).items():
            telemetry.MESSAGES_OUT.labels(topic).inc(n)

    def _item(
        self, event: Event, headers: Mapping[str, str] | None
    ) -> tuple[str, bytes, str, Mapping[str, str] | None]:
        payload = event.model_dump_json().encode()
        if self._key is not None:
            headers = signing.with_signature(self._key, event.TOPIC, payload, headers)
        return event.TOPIC, payload, event.key, headers

    async def publish_many(
        self, items: Sequence[tuple[str, bytes, str, Mapping[str, str] | None]], ack: Ack | None = None
    ) -> None:
        """Put several (topic, payload, key, headers) messages on the bus; a transport that can send them in one
        round trip does (Redis: one pipeline), the others send them concurrently. Only a transport that hands
        out acknowledgements (`dispatch`'s `ack`) gets one back."""
        await asyncio.gather(*(self.publish_raw(*item) for item in items))

    @abstractmethod
    async def publish_raw(self, topic: str, payload: bytes, key: str, headers: Mapping[str, str] | None = None) -> None:
        """Put raw bytes on a topic with optional headers (trace context); tests inject poison messages."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and start consuming every registered route."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop consuming and disconnect."""

    async def __aenter__(self) -> Bus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def group_of(self, route: Route[Any]) -> str:
        """The consumer group name on the wire: shared by instances, or per instance for broadcasts."""
        return f"{route.group}.{self.settings.instance_id}" if route.broadcast else route.group

    async def dispatch(
        self,
        route: Route[E],
        items: Sequence[Any],
        headers: Sequence[Mapping[str, Any] | None] | None = None,
        ack: Ack | None = None,
    ) -> None:
        """Decode a raw batch, dead-letter what is invalid, drop redeliveries, run the handler, publish.

        `headers[i]` are item i's message headers (with tracing on, its trace context is the parent of its span).
        `ack`: the transport's acknowledgement of the batch, sent with (after) the outputs' publication."""
        group = route.group
        seen = self._seen.setdefault(group, SeenIds(self.settings.dedupe_window))
        telemetry.MESSAGES_IN.labels(route.topic, group).inc(len(items))
        events: list[E] = []
        dead: list[DeadLetter] = []
        carriers: list[Mapping[str, Any] | None] = []
        batch_ids: set[str] = set()
        for i, raw in enumerate(items):
            size = len(raw) if isinstance(raw, bytes | str) else 0
            if size > self.settings.max_message_bytes:  # not parsed: a huge JSON costs time and memory
                limit = self.settings.max_message_bytes
                dead.append(self._dead_letter(route, raw, f"message of {size} bytes exceeds the limit of {limit}"))
                continue
            if self._key is not None and not signing.verified(
                self._key, route.topic, raw, headers[i] if headers else None
            ):
                dead.append(self._dead_letter(route, raw, "unsigned or wrongly signed message (FLOCKWATCH_BUS_KEY)"))
                continue
            try:
                event = (
                    route.model.model_validate_json(raw)
                    if isinstance(raw, bytes | str)
                    else route.model.model_validate(raw)
                )
            except ValidationError as exc:
                dead.append(self._dead_letter(route, raw, f"invalid {route.model.__name__}: {exc}"))
                continue
            if event.message_id in seen or event.message_id in batch_ids:
                telemetry.DUPLICATES.labels(route.topic, group).inc()
                continue
            batch_ids.add(event.message_id)
            events.append(event)
            if tracing.ENABLED:
                carriers.append(headers[i] if headers else None)
        if tracing.ENABLED and events and not route.parts:
            with tracing.consuming(route.topic, group, self.settings.bus_scheme, events, carriers):
                await self._handle(route, events, dead, ack)
        else:  # co-hosted parts each trace their own handling (`_run_parts`)
            await self._handle(route, events, dead, ack, carriers)
        for event in events:
            seen.add(event.message_id)
        if self.lingers:
            linger = self._lingers.setdefault(self.group_of(route) + route.topic, Linger(route.max_wait_ms / 1000))
            pause = linger.after([e.key for e in events], len(items) >= route.max_batch)
            if pause:
                await asyncio.sleep(pause)

    async def _handle(
        self,
        route: Route[E],
        events: list[E],
        dead: list[DeadLetter],
        ack: Ack | None,
        carriers: Sequence[Mapping[str, Any] | None] = (),
    ) -> None:
        """Run the handler on the valid events, publish its outputs and the dead letters."""
        group = route.group
        outputs: list[Event] = []
        made_by: dict[int, Any] = {}
        if events:
            telemetry.BATCH_SIZE.labels(group).observe(len(events))
            start = time.perf_counter()
            if route.parts:
                outputs, failed, made_by = await self._run_parts(route, events, carriers)
            else:
                outputs, failed = await self._run(route, events)
            telemetry.HANDLER_SECONDS.labels(group).observe(time.perf_counter() - start)
            dead += failed
        with tracing.made_by(made_by):  # co-hosted parts: each output continues its own part's span
            await self.publish([*outputs, *dead], ack=ack)
        if outputs and route.published is not None:
            await route.published(outputs)

    async def _run_parts(
        self, route: Route[E], events: list[E], carriers: Sequence[Mapping[str, Any] | None]
    ) -> tuple[list[Event], list[DeadLetter], dict[int, Any]]:
        """A co-hosted route: each part's handler on the batch, isolated (and traced) as if it ran alone; the
        outputs, the dead letters, and with tracing on the span each output continues."""

        async def part(p: Route[E]) -> tuple[list[Event], list[DeadLetter], dict[int, Any]]:
            if not tracing.ENABLED:
                return (*await self._run(p, events), {})
            with tracing.consuming(route.topic, p.group, self.settings.bus_scheme, events, carriers):
                outputs, dead = await self._run(p, events)
                return outputs, dead, tracing.parents_of([*outputs, *dead])

        results = await asyncio.gather(*(part(p) for p in route.parts), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # given back (TRANSIENT, after its pause) or cancelled: the whole batch is handled again
            raise failed[0]
        outputs: list[Event] = []
        dead: list[DeadLetter] = []
        made_by: dict[int, Any] = {}
        for part_outputs, part_dead, part_made_by in results:  # type: ignore[misc]
            outputs += part_outputs
            dead += part_dead
            made_by |= part_made_by
        return outputs, dead, made_by

    async def _run(self, route: Route[E], events: list[E]) -> tuple[list[Event], list[DeadLetter]]:
        try:
            return list(await route.handler(events)), []
        except TRANSIENT as exc:
            await self._give_back(route, events, exc)
        except Exception:  # noqa: BLE001 - isolate the message that breaks the batch
            log.exception("handler %s failed on a batch of %d; retrying one by one", route.group, len(events))
        outputs: list[Event] = []
        dead: list[DeadLetter] = []
        for event in events:
            try:
                outputs += await route.handler([event])
            except TRANSIENT as exc:
                await self._give_back(route, events, exc)
            except Exception as exc:  # noqa: BLE001 - a poison message goes to the dead-letter topic
                dead.append(self._dead_letter(route, event.model_dump_json(), f"{type(exc).__name__}: {exc}"))
        return outputs, dead

    @staticmethod
    async def _give_back(route: Route[Any], events: list[Any], exc: BaseException) -> NoReturn:
        name, size = type(exc).__name__, len(events)
        log.warning("handler %s: %s: %s; its batch of %d is handled again later", route.group, name, exc, size)
        await asyncio.sleep(TRANSIENT_PAUSE_S)
        raise exc

    def _dead_letter(self, route: Route[Any], raw: Any, error: str) -> DeadLetter:
        text, size = _as_text(raw)
        telemetry.DEAD_LETTERS.labels(route.topic, route.group).inc()
        log.warning("dead letter on %s for %s: %s", route.topic, route.group, error.splitlines()[0][:300])
        # a quarter of the size limit at most: a dead letter must never be too large itself (it would loop)
        kept = _clip(text, min(MAX_DEAD_PAYLOAD, self.settings.max_message_bytes // 4))
        return DeadLetter(
            message_id=f"dead:{route.group}:{time.time_ns()}",
            topic=route.topic,
            consumer=route.group,
            error=error[:4000],
            payload=kept,
            payload_size=size,
            truncated=len(kept) < len(text),
        )


def _json_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", errors="replace"))


def _clip(text: str, limit: int) -> str:
    """The longest prefix of `text` whose JSON form fits in `limit` bytes: a dead letter stays below the message
    size limit whatever its payload's characters (multi-byte, escaped), so it is never dead-lettered itself."""
    if 6 * len(text) + 2 <= limit or _json_size(text) <= limit:  # 6 bytes: a character's longest JSON form
        return text
    low, high = 0, min(len(text), limit)
    while low < high:  # the largest fitting prefix length (fitting is monotone in the length)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _json_size(text[:mid]) <= limit else (low, mid - 1)
    return text[:low]


def create_bus(settings: CommonSettings) -> Bus:
    """The bus named by `settings.bus_url`."""
    if settings.bus_scheme == "memory":
        from flockwatch.common.bus_memory import MemoryBus

        return MemoryBus(settings)
    from flockwatch.common.bus_faststream import FastStreamBus

    return FastStreamBus(settings)


__all__ = ["Bus", "Route", "create_bus", "topics"]
