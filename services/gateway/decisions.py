"""Where the gateway keeps decisions and the requests waiting for them."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from flockwatch.common.events import Decision


class DecisionBook:
    """Futures keyed by text id for waiting requests, and a bounded memory of recent decisions."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._decisions: OrderedDict[str, Decision] = OrderedDict()
        self._waiting: dict[str, asyncio.Future[Decision]] = {}

    def get(self, text_id: str) -> Decision | None:
        """A remembered decision."""
        return self._decisions.get(text_id)

    def wait_for(self, text_id: str) -> asyncio.Future[Decision]:
        """A future resolved when the decision for `text_id` arrives (shared by concurrent waiters)."""
        future = self._waiting.get(text_id)
        if future is None:
            future = self._waiting[text_id] = asyncio.get_running_loop().create_future()
        return future

    def forget_waiter(self, text_id: str) -> None:
        """Drop a waiter that gave up."""
        future = self._waiting.pop(text_id, None)
        if future is not None and not future.done():
            future.cancel()

    def record(self, decisions: list[Decision]) -> None:
        """Store decisions and wake whoever waits for them."""
        for decision in decisions:
            self._decisions[decision.text_id] = decision
            self._decisions.move_to_end(decision.text_id)
            future = self._waiting.pop(decision.text_id, None)
            if future is not None and not future.done():
                future.set_result(decision)
        while len(self._decisions) > self.keep:
            self._decisions.popitem(last=False)

    @property
    def waiting(self) -> int:
        """Requests waiting for a decision."""
        return len(self._waiting)
