"""When the trainer retrains by itself: enough new clean corrections once a review session has settled, or
a schedule when anything is new. (Commands and drift queue runs directly.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from flockwatch.common.events import FeedbackSubmitted
from flockwatch.feedback.training import clean_training_rows
from flockwatch.trainer.store import QueueFull

if TYPE_CHECKING:
    from flockwatch.trainer.app import TrainerService

log = logging.getLogger(__name__)


class Triggers:
    """Checked when corrections arrive on the bus and every `CHECK_INTERVAL_S`."""

    def __init__(self, service: TrainerService) -> None:
        self.service = service
        self._poke = asyncio.Event()  # new corrections arrived
        self._last_correction = 0.0  # when the bus last brought one (monotonic)
        self._last_schedule = time.monotonic()

    async def on_feedback(self, msgs: list[FeedbackSubmitted]) -> list[Any]:
        """New corrections may reach the retrain threshold: check soon."""
        if any(m.label is not None for m in msgs):
            self._last_correction = time.monotonic()
            self._poke.set()
        return []

    async def loop(self) -> None:
        """Check on every poke, at least every `CHECK_INTERVAL_S`."""
        while True:
            with contextlib.suppress(TimeoutError):  # not `wait_for`: see `TrainerService._worker`
                async with asyncio.timeout(self.service.settings.trainer_check_interval_s):
                    await self._poke.wait()
            self._poke.clear()
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - a failed check (database blip) must not end the loop
                log.exception("trainer: trigger check failed")

    async def check(self) -> dict[str, Any] | None:
        """Queue a full run on enough new clean corrections, or when the schedule is due and anything is new;
        not while a correction arrived less than `SETTLE_S` ago (one run per review session) or a full run waits."""
        svc, s = self.service, self.service.settings
        if time.monotonic() - self._last_correction < s.trainer_settle_s or await svc.store.active("full"):
            return None
        since = await svc.store.watermark()
        raw = await svc.feedback.count_feedback_since(since)
        due = s.trainer_schedule_s is not None and time.monotonic() - self._last_schedule >= s.trainer_schedule_s
        if raw < s.trainer_min_corrections and not (due and raw):
            return None
        clean = await clean_training_rows(svc.feedback, svc.classes(), since_seq=since, hygiene=False)
        try:
            if len(clean.rows) >= s.trainer_min_corrections:
                return await svc.request_run("full", "corrections", f"{len(clean.rows)} new clean corrections")
            if due and clean.rows:
                self._last_schedule = time.monotonic()
                return await svc.request_run("full", "schedule", f"{len(clean.rows)} new clean corrections")
        except QueueFull as exc:  # the next check tries again
            log.warning("trainer: no retrain queued: %s", exc)
        return None
