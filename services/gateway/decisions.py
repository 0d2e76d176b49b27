"""Where the gateway keeps decisions, the requests waiting for them, and the texts still in flight."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable

from flockwatch.common.events import Decision
from flockwatch.gateway.tenancy import tenant_of_id


class DecisionBook:
    """Futures keyed by text id for waiting requests, a bounded memory of recent decisions, and the texts
    accepted without a waiter (`POST /texts`) until their decision comes or `accepted_ttl_s` passes."""

    def __init__(self, keep: int, accepted_ttl_s: float) -> None:
        self.keep = keep
        self.accepted_ttl_s = accepted_ttl_s
        # as JSON: a string is one object the garbage collector never visits, a Decision (votes, dicts, lists) is
        # dozens, and a full collection over 100,000 kept decisions paused the gateway for up to a second
        self._decisions: OrderedDict[str, str] = OrderedDict()
        # text id → its future and when the wait began (monotonic), in the order the waits began
        self._waiting: dict[str, tuple[asyncio.Future[Decision], float]] = {}
        self._accepted: OrderedDict[str, float] = OrderedDict()  # text id → when accepted (monotonic)
        self._per_tenant: Counter[str] = Counter()  # tenant → its entries in the two above

    def get(self, text_id: str) -> Decision | None:
        """A remembered decision."""
        kept = self._decisions.get(text_id)
        return Decision.model_validate_json(kept) if kept is not None else None

    def waiting_for(self, text_id: str) -> asyncio.Future[Decision] | None:
        """The future of a request already waiting for `text_id`, if any."""
        waiting = self._waiting.get(text_id)
        return waiting[0] if waiting else None

    def wait_for(self, text_id: str) -> asyncio.Future[Decision]:
        """A future resolved when the decision for `text_id` arrives (shared by concurrent waiters)."""
        if text_id not in self._waiting:
            self._waiting[text_id] = (asyncio.get_running_loop().create_future(), time.monotonic())
            self._count(text_id, 1)
        return self._waiting[text_id][0]

    def accept(self, text_ids: Iterable[str]) -> None:
        """Count texts accepted without a waiter as in flight until decided (or until the TTL passes)."""
        now = time.monotonic()
        for text_id in text_ids:
            if text_id not in self._accepted:
                self._count(text_id, 1)
            self._accepted[text_id] = now
            self._accepted.move_to_end(text_id)

    def unaccept(self, text_id: str) -> None:
        """Forget an accepted text that was not published after all (nothing will decide it)."""
        if self._accepted.pop(text_id, None) is not None:
            self._count(text_id, -1)

    def in_flight_for(self, text_id: str) -> bool:
        """Whether `text_id` is waited for or accepted and not yet decided."""
        return text_id in self._waiting or text_id in self._accepted

    def forget_waiter(self, text_id: str) -> None:
        """Drop a waiter that gave up."""
        future, _ = self._waiting.pop(text_id, (None, 0.0))
        if future is not None:
            self._count(text_id, -1)
            if not future.done():
                future.cancel()

    def record(self, decisions: list[Decision]) -> None:
        """Store decisions and wake whoever waits for them."""
        for decision in decisions:
            self._decisions[decision.text_id] = decision.model_dump_json()
            self._decisions.move_to_end(decision.text_id)
            self.unaccept(decision.text_id)
            future, _ = self._waiting.pop(decision.text_id, (None, 0.0))
            if future is not None:
                self._count(decision.text_id, -1)
                if not future.done():
                    future.set_result(decision)
        while len(self._decisions) > self.keep:
            self._decisions.popitem(last=False)

    @property
    def in_flight(self) -> int:
        """Texts accepted and not yet decided: waited for, or submitted asynchronously within the TTL."""
        horizon = time.monotonic() - self.accepted_ttl_s
        while self._accepted:
            text_id, since = next(iter(self._accepted.items()))
            if since >= horizon:
                break
            del self._accepted[text_id]
            self._count(text_id, -1)
        return len(self._waiting) + len(self._accepted)

    def in_flight_of(self, tenant: str) -> int:
        """Texts of `tenant` in flight (counted as `in_flight` counts them)."""
        _ = self.in_flight  # the accepted texts past their TTL leave the count first
        return self._per_tenant[tenant]

    def _count(self, text_id: str, step: int) -> None:
        tenant = tenant_of_id(text_id)
        if tenant is not None:
            self._per_tenant[tenant] += step
            if self._per_tenant[tenant] <= 0:
                del self._per_tenant[tenant]

    @property
    def oldest_wait_s(self) -> float:
        """How long the oldest text in flight has waited for its decision (0 when none is)."""
        starts = [next(iter(self._waiting.values()))[1]] if self._waiting else []
        starts += [next(iter(self._accepted.values()))] if self._accepted else []
        return time.monotonic() - min(starts) if starts else 0.0
