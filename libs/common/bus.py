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
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from flockwatch.common import telemetry, topics
from flockwatch.common.events import DeadLetter, Event
from flockwatch.common.settings import CommonSettings
from pydantic import ValidationError

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)
Handler = Callable[[list[E]], Awaitable[Sequence[Event]]]
MAX_DEAD_PAYLOAD = 256 * 1024


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

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self.routes: list[Route[Any]] = []
        self._seen: dict[str, SeenIds] = {}

    def subscribe(
        self, topic: str, model: type[E], group: str, *, broadcast: bool = False
    ) -> Callable[[Handler[E]], Handler[E]]:
        """Decorator registering a batch handler for `topic`."""

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
                )
            )
            return handler

        return register

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish events, each to its type's topic, keyed by its text id; concurrently (pipelined)."""
        if not events:
            return
        await asyncio.gather(*(self.publish_raw(e.TOPIC, e.model_dump_json().encode(), e.key) for e in events))
        for e in events:
            telemetry.MESSAGES_OUT.labels(e.TOPIC).inc()

    @abstractmethod
    async def publish_raw(self, topic: str, payload: bytes, key: str) -> None:
        """Put raw bytes on a topic (tests use it to inject poison messages)."""

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

    async def dispatch(self, route: Route[E], items: Sequence[Any]) -> None:
        """Decode a raw batch, dead-letter what is invalid, drop redeliveries, run the handler, publish."""
        group = route.group
        seen = self._seen.setdefault(group, SeenIds(self.settings.dedupe_window))
        telemetry.MESSAGES_IN.labels(route.topic, group).inc(len(items))
        events: list[E] = []
        dead: list[DeadLetter] = []
        for raw in items:
            try:
                event = (
                    route.model.model_validate_json(raw)
                    if isinstance(raw, bytes | str)
                    else route.model.model_validate(raw)
                )
            except ValidationError as exc:
                dead.append(self._dead_letter(route, raw, f"invalid {route.model.__name__}: {exc}"))
                continue
            if event.message_id in seen or any(e.message_id == event.message_id for e in events):
                telemetry.DUPLICATES.labels(route.topic, group).inc()
                continue
            events.append(event)
        outputs: list[Event] = []
        if events:
            telemetry.BATCH_SIZE.labels(group).observe(len(events))
            start = time.perf_counter()
            outputs, failed = await self._run(route, events)
            telemetry.HANDLER_SECONDS.labels(group).observe(time.perf_counter() - start)
            dead += failed
        await self.publish([*outputs, *dead])
        for event in events:
            seen.add(event.message_id)

    async def _run(self, route: Route[E], events: list[E]) -> tuple[list[Event], list[DeadLetter]]:
        try:
            return list(await route.handler(events)), []
        except Exception:  # noqa: BLE001 - isolate the message that breaks the batch
            log.exception("handler %s failed on a batch of %d; retrying one by one", route.group, len(events))
        outputs: list[Event] = []
        dead: list[DeadLetter] = []
        for event in events:
            try:
                outputs += await route.handler([event])
            except Exception as exc:  # noqa: BLE001 - a poison message goes to the dead-letter topic
                dead.append(self._dead_letter(route, event.model_dump_json(), f"{type(exc).__name__}: {exc}"))
        return outputs, dead

    def _dead_letter(self, route: Route[Any], raw: Any, error: str) -> DeadLetter:
        text, size = _as_text(raw)
        telemetry.DEAD_LETTERS.labels(route.topic, route.group).inc()
        log.warning("dead letter on %s for %s: %s", route.topic, route.group, error.splitlines()[0][:300])
        return DeadLetter(
            message_id=f"dead:{route.group}:{time.time_ns()}",
            topic=route.topic,
            consumer=route.group,
            error=error[:4000],
            payload=text[:MAX_DEAD_PAYLOAD],
            payload_size=size,
            truncated=len(text) > MAX_DEAD_PAYLOAD,
        )


def create_bus(settings: CommonSettings) -> Bus:
    """The bus named by `settings.bus_url`."""
    if settings.bus_scheme == "memory":
        from flockwatch.common.bus_memory import MemoryBus

        return MemoryBus(settings)
    from flockwatch.common.bus_faststream import FastStreamBus

    return FastStreamBus(settings)


__all__ = ["Bus", "Route", "create_bus", "topics"]
