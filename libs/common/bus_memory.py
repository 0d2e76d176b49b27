"""The in-process bus (`memory://`): asyncio queues with consumer groups, the embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from flockwatch.common.bus import TRANSIENT, Bus, Route

log = logging.getLogger(__name__)

Item = tuple[bytes, Mapping[str, str] | None]  # a message: its payload and headers (trace context)


class MemoryBus(Bus):
    """Each (topic, group) is a queue; instances of a group compete for it, like a broker's group."""

    lingers = False  # see `_consume`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queues: dict[str, dict[str, asyncio.Queue[Item]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def _queue(self, route: Route[Any]) -> asyncio.Queue[Item]:
        groups = self._queues.setdefault(route.topic, {})
        return groups.setdefault(self.group_of(route), asyncio.Queue())

    async def publish_raw(self, topic: str, payload: bytes, key: str, headers: Mapping[str, str] | None = None) -> None:
        for queue in self._queues.get(topic, {}).values():
            queue.put_nowait((payload, headers))

    async def start(self) -> None:
        for route in self.routes:
            queue = self._queue(route)
            self._tasks.append(asyncio.create_task(self._consume(route, queue), name=f"consume:{route.group}"))

    async def _consume(self, route: Route[Any], queue: asyncio.Queue[Item]) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < route.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            # wait for stragglers only under load (more than one was waiting): a lone text goes at once. In
            # process a batch has no round trips to share, so this is all the waiting the memory bus does.
            if 1 < len(batch) < route.max_batch and route.max_wait_ms:
                await asyncio.sleep(route.max_wait_ms / 1000)
                while len(batch) < route.max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
            await self._deliver(route, batch)

    async def _deliver(self, route: Route[Any], batch: list[Item]) -> None:
        """Dispatch a batch until it goes through: in memory nobody would deliver it again. A handler's service
        being down (TRANSIENT, after the bus's pause) means trying again; anything else is logged, and the
        consumer goes on with the next batch rather than dying."""
        while True:
            try:
                await self.dispatch(route, [payload for payload, _ in batch], [headers for _, headers in batch])
                return
            except TRANSIENT:
                continue
            except Exception:  # noqa: BLE001 - one broken batch must not stop the consumer
                log.exception("consumer %s dropped a batch of %d it could not dispatch", route.group, len(batch))
                return

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:  # bounded: a handler stuck in a cancelled client call must not block shutdown
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 5.0)
        self._tasks.clear()
