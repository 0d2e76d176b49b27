"""The feedback service's database gauges (review queue, rule precision, conflicts, reviewer agreement): computed
in the background every `feedback_metrics_interval_s`, so that a Prometheus scrape reads numbers that are
already there and never queries Postgres (anonymous scrapers once slowed `POST /feedback` twenty-fold)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from flockwatch.feedback.config import TaskConfig
from flockwatch.feedback.review import conflicts, feedback_groups, review_queue, reviewers, rules_report
from flockwatch.feedback.store import TRANSIENT, FeedbackStore

log = logging.getLogger(__name__)


async def refresh_gauges(store: FeedbackStore, task: TaskConfig) -> None:
    """Set every database gauge from Postgres (the reports set their gauges as they go)."""
    await rules_report(store, task)
    await review_queue(store, task, 1)
    groups = await feedback_groups(store)
    conflicts(groups)
    reviewers(groups)


class Refresher:
    """Runs `compute` now and then every `interval_s` until stopped; a failure is logged and retried next time."""

    def __init__(self, compute: Callable[[], Awaitable[None]], interval_s: float) -> None:
        self.compute = compute
        self.interval_s = interval_s
        self.runs = 0  # computations finished
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background loop."""
        self._task = asyncio.create_task(self._loop(), name="feedback-gauges")

    async def stop(self) -> None:
        """Stop the loop (a computation in progress is cancelled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.compute()
                self.runs += 1
            except TRANSIENT:
                log.warning("feedback: database gauges not refreshed (Postgres unreachable)")
            except Exception:  # noqa: BLE001 - the gauges must not stop refreshing for good
                log.exception("feedback: refreshing the database gauges failed")
            await asyncio.sleep(self.interval_s)
