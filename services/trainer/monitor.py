"""The trainer's drift watch: the arbiter's decisions into the champion's drift monitor. An alarm queues a
calibration-only run; an alarm after that (the drift outlived the recalibration) a full retrain."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flockwatch.common import telemetry
from flockwatch.common.announcements import Announcements
from flockwatch.common.artifacts import ArtifactError
from flockwatch.common.datasets import Dataset, read_table, split
from flockwatch.common.events import Decision, ModelPublished
from flockwatch.trainer.drift import DriftMonitor, nonconformity
from flockwatch.trainer.store import FINAL, QueueFull

if TYPE_CHECKING:
    from flockwatch.trainer.app import TrainerService

log = logging.getLogger(__name__)
Kind = Literal["full", "recalibrate"]


def reference_scores(model_dir: Path, texts: list[str]) -> tuple[list[float], str]:
    """The bundle's nonconformity scores on held-out texts (decided as the services decide), its arbiter version."""
    from flockwatch.arbiter.app import load_policy
    from flockwatch.trainer.evaluate import decide_all

    policy = load_policy(model_dir)
    run = decide_all(model_dir, texts, policy=policy)
    return [nonconformity(d.confidence) for d in run.decisions if d.path != "no_votes"], policy.version


class DriftWatch:
    """One monitor per champion; reset when a new bundle is published (or rolled back to)."""

    def __init__(self, service: TrainerService) -> None:
        self.service = service
        self.monitor: DriftMonitor | None = None
        self.champion: str | None = None  # the version directory the monitor's reference came from
        self.reference: list[float] = []
        self.last_alarm: dict[str, Any] | None = None
        self._texts: list[str] | None = None
        self.announcements = Announcements(service.settings, "trainer")

    def _reference_texts(self) -> list[str]:
        if self._texts is None:
            s = self.service.settings
            data = read_table(s.trainer_data, s.trainer_text_col, s.trainer_label_col)
            if s.trainer_base_limit:
                data = Dataset(data.texts[: s.trainer_base_limit], data.labels[: s.trainer_base_limit])
            # the test split: texts no champion trained on (trained with --test-frac 0.25, as the trainer's
            # own runs are), whichever calibration scheme it used
            self._texts = split(data)["test"].texts
        return self._texts

    async def reset(self, bundle: Path | None) -> None:
        """Compute the reference scores of `bundle` and start a fresh monitor (None, or no reference: no monitor)."""
        s = self.service.settings
        self.monitor = None
        if bundle is None or not s.trainer_drift:
            return
        try:
            texts = await asyncio.to_thread(self._reference_texts)
            self.reference, version = await asyncio.to_thread(reference_scores, bundle, texts)
        except (ArtifactError, OSError, ValueError) as exc:  # the runs report the same problem in their own record
            log.error("trainer: no drift monitor for %s: %s", bundle, exc)
            return
        self.champion = bundle.resolve().name
        telemetry.set_model_version("trainer_champion", self.champion)
        self._restart(version)
        log.info("trainer: drift reference of %s: %d held-out scores", self.champion, len(self.reference))

    def _restart(self, version: str) -> None:
        s = self.service.settings
        self.monitor = DriftMonitor(
            self.reference, version, s.trainer_drift_delta, s.trainer_drift_jump, s.trainer_drift_window
        )

    async def on_decisions(self, msgs: list[Decision]) -> list[Any]:
        """Feed the decisions of the champion's arbiter to the monitor; an alarm queues a run."""
        monitor = self.monitor
        if monitor is None:
            return []
        scores = [
            nonconformity(m.confidence)
            for m in msgs
            if m.path != "no_votes" and m.arbiter_version == monitor.state.version
        ]
        alarm = bool(scores) and monitor.update(scores)
        telemetry.DRIFT_MARTINGALE.set(monitor.state.martingale)
        if alarm:
            await self._alarm(monitor)
        return []

    async def on_model(self, msgs: list[ModelPublished]) -> list[Any]:
        """A newly published (or rolled-back-to) bundle: a new reference, a fresh monitor."""
        for _, path in await self.announcements.admit(m for m in msgs if m.component == "bundle"):
            if path.name != self.champion:
                await self.reset(path)
        return []

    async def _alarm(self, monitor: DriftMonitor) -> None:
        state = monitor.state
        monitor.ks()
        action, run_id = "none", None
        if self.service.settings.trainer_drift_action:
            last = await self.service.store.last_drift_run()
            if last is not None and last["status"] not in FINAL:
                action = "pending"
            else:
                # drift that outlives a recalibration calls for a full retrain (then recalibration first again)
                kind: Kind = "full" if last is not None and last["kind"] == "recalibrate" else "recalibrate"
                reason = f"drift: martingale {state.martingale:.3g} after {state.n_live} decisions"
                try:
                    run = await self.service.request_run(kind, "drift", reason)
                    action, run_id = kind, run["run_id"]
                except QueueFull as exc:
                    log.warning("trainer: drift alarm queued no run: %s", exc)
                    action = "queue full"
        event_id = await self.service.store.add_drift(state.to_dict(), action, run_id)
        self.last_alarm = {"event_id": event_id, "action": action, "run_id": run_id, **state.to_dict()}
        telemetry.DRIFT_ALARMS.labels(action).inc()
        log.warning("trainer: drift alarm %s on %s: %s", event_id, self.champion, action)
        self._restart(state.version)  # watch on: drift that persists raises the next step

    def status(self) -> dict[str, Any]:
        """The monitor's state for `GET /drift`."""
        if self.monitor is None:
            return {"enabled": False, "last_alarm": self.last_alarm}
        self.monitor.ks()
        return {
            "enabled": True,
            "champion": self.champion,
            "threshold": 1 / self.monitor.delta,
            **self.monitor.state.to_dict(),
            "last_alarm": self.last_alarm,
        }
