"""The trainer service: retrains on feedback, a command, a schedule or drift; gates; publishes; one run at a time.

Runs are rows in Postgres (the queue); each runs in a process of its own (`job.py`, so cancel can stop
it) while this event loop keeps serving the bus and the HTTP API. A run whose gate passed is moved under the
model root, `current` is re-pointed, the history records it, and `ModelPublished` makes every service load it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from flockwatch.common import telemetry, topics
from flockwatch.common.artifacts import read_manifest, verified_file
from flockwatch.common.bus import Bus
from flockwatch.common.events import Decision, FeedbackSubmitted, ModelPublished
from flockwatch.common.http import EmbeddedServer
from flockwatch.common.labels import LabelConfig
from flockwatch.common.service import Service
from flockwatch.feedback.store import FeedbackStore
from flockwatch.feedback.training import clean_training_rows
from flockwatch.trainer import registry
from flockwatch.trainer.gate import summary_line
from flockwatch.trainer.job import JobSpec
from flockwatch.trainer.monitor import DriftWatch
from flockwatch.trainer.rollout import Rollout
from flockwatch.trainer.runner import JobFailed, JobProcess
from flockwatch.trainer.settings import TrainerSettings
from flockwatch.trainer.store import FINAL, QueueFull, TrainerStore
from flockwatch.trainer.triggers import Triggers

RETRY = "retry of interrupted run"
log = logging.getLogger(__name__)
Kind = Literal["full", "recalibrate"]


class RunNotFound(KeyError):
    """No run has this id."""


class TrainerService(Service):
    """Triggers, the run queue and its worker, publishing, and the drift watch."""

    name = "trainer"

    def __init__(self, bus: Bus, settings: TrainerSettings | None = None) -> None:
        self.settings = settings or TrainerSettings()
        self.bus = bus
        self.drift = DriftWatch(self)
        self._store: TrainerStore | None = None
        self._feedback: FeedbackStore | None = None
        self._current: str | None = None  # the run the worker is on
        self._job: JobProcess | None = None  # its process, once started
        self._cancelled: set[str] = set()
        self._wake = asyncio.Event()  # a run was queued
        self._tasks: list[asyncio.Task[None]] = []
        self._server: EmbeddedServer | None = None
        self.http_port: int | None = None
        self.triggers = Triggers(self)
        self.rollout = Rollout(self)
        bus.subscribe(topics.FEEDBACK_SUBMITTED, FeedbackSubmitted, group=self.name)(self.triggers.on_feedback)
        bus.subscribe(topics.DECISION_MADE, Decision, group=self.name)(self.drift.on_decisions)
        bus.subscribe(topics.MODEL_PUBLISHED, ModelPublished, group=self.name, broadcast=True)(self.drift.on_model)

    @property
    def store(self) -> TrainerStore:
        """The runs table (after `start`)."""
        if self._store is None:
            raise RuntimeError("the trainer service is not started")
        return self._store

    @property
    def feedback(self) -> FeedbackStore:
        """The feedback service's tables (after `start`)."""
        if self._feedback is None:
            raise RuntimeError("the trainer service is not started")
        return self._feedback

    def champion(self) -> Path | None:
        """The published version `current` points at (its own directory, not the link)."""
        version = registry.current_version(self.settings.models_root)
        return self.settings.models_root / version if version else None

    async def start(self) -> None:
        from flockwatch.feedback.migrate import upgrade_async as upgrade_feedback
        from flockwatch.trainer.migrate import upgrade_async

        s = self.settings
        if s.trainer_migrate:
            await upgrade_async(s.trainer_database_url, s.trainer_db_schema)
            await upgrade_feedback(s.trainer_database_url, s.trainer_feedback_schema)  # read before it has run
        self._store = await TrainerStore.connect(s.trainer_database_url, s.trainer_db_schema)
        self._feedback = await FeedbackStore.connect(s.trainer_database_url, s.trainer_feedback_schema, size=2)
        for run in await self.store.interrupt_running():
            await self._retry(run)
        await self.drift.reset(self.champion())
        self._tasks = [
            asyncio.create_task(self._worker(), name="trainer-worker"),
            asyncio.create_task(self.triggers.loop(), name="trainer-triggers"),
            asyncio.create_task(self.rollout.loop(), name="trainer-rollout"),
        ]
        if s.trainer_serve_http:
            from flockwatch.trainer.api import create_app

            self._server = EmbeddedServer.of(create_app(self), s.trainer_host, s.trainer_port)
            self.http_port = await self._server.start("trainer-http")
            log.info("trainer: HTTP on %s:%s", s.trainer_host, self.http_port)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
        if self._job is not None:
            await self._job.terminate(self.settings.trainer_cancel_grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for store in (self._store, self._feedback):
            if store is not None:
                await store.close()
        self._store = self._feedback = None

    # --- requests -----------------------------------------------------------------------------------------

    async def _retry(self, run: dict[str, Any]) -> None:
        """A run the last stop interrupted: marked failed, and queued again once (not a retry of a retry)."""
        reason = run.get("reason") or ""
        if reason.startswith(RETRY):
            log.warning("trainer: run %s (itself a retry) was interrupted by the last stop; not retried", run["run_id"])
            return
        log.warning("trainer: run %s was interrupted by the last stop; queued again", run["run_id"])
        try:
            await self.request_run(run["kind"], run["trigger"], f"{RETRY} {run['run_id']} ({reason})")
        except QueueFull as exc:
            log.warning("trainer: run %s not queued again: %s", run["run_id"], exc)

    async def request_run(self, kind: Kind, trigger: str, reason: str | None = None) -> dict[str, Any]:
        """Queue a run; the worker starts it when no other run is running. At most `trainer_max_queued` runs wait
        (`QueueFull` beyond); an automatic trigger (anything but a command) gets the run of its kind already
        queued, if any, instead of a second one."""
        run_id = uuid.uuid4().hex[:16]
        limit = self.settings.trainer_max_queued
        run = await self.store.add_run(run_id, kind, trigger, reason, limit=limit, reuse=trigger != "command")
        if run["run_id"] != run_id:
            log.info(
                "trainer: %s run %s is queued already; not queuing another (%s: %s)",
                kind,
                run["run_id"],
                trigger,
                reason,
            )
            return run
        champion = self.champion()
        if champion is not None:
            await self.store.update(run["run_id"], champion_version=champion.name)
        log.info("trainer: queued %s run %s (%s: %s)", kind, run["run_id"], trigger, reason)
        queued = await self.run(run["run_id"])  # read before waking the worker: the answer says "queued"
        self._wake.set()
        return queued

    async def run(self, run_id: str) -> dict[str, Any]:
        """A run's record."""
        row = await self.store.run(run_id)
        if row is None:
            raise RunNotFound(run_id)
        return row

    async def cancel(self, run_id: str) -> dict[str, Any]:
        """Cancel a queued run, or stop a running one (its process is terminated); a finished run stays as is."""
        row = await self.run(run_id)
        if row["status"] == "queued":
            await self.store.cancel_queued(run_id)
        elif row["status"] == "running" and self._current == run_id:
            self._cancelled.add(run_id)
            if self._job is not None:
                await self._job.terminate(self.settings.trainer_cancel_grace_s)
            await self.finish(run_id, "cancelled", progress="cancelled while running; its process was terminated")
        return await self.run(run_id)

    def classes(self) -> list[str] | None:
        """The task's classes: the configured labels.yaml, else the champion's (None: any label)."""
        labels = self.settings.trainer_labels
        champion = self.champion()
        if labels is None and champion is not None and "labels.yaml" in read_manifest(champion, verify=False).files:
            labels = verified_file(champion, "labels.yaml")
        return LabelConfig.load(labels).names if labels else None

    # --- the worker ---------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            self._wake.clear()
            try:
                run = await self.store.claim_next()
                if run is not None:
                    await self._execute(run)
                    continue
            except Exception:  # noqa: BLE001 - keep the queue alive; the run itself is marked failed
                log.exception("trainer: the worker failed")
            # not `wait_for`: on Python 3.11 it swallows a cancel that comes as the event is set (a run requested
            # just before stop), and the worker would sleep on, holding up the stop for a check interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.trainer_check_interval_s):
                    await self._wake.wait()

    async def _spec(self, run: dict[str, Any], champion: Path | None) -> JobSpec:
        s, kind = self.settings, run["kind"]
        classes = self.classes()
        rows = await clean_training_rows(self.feedback, classes)  # the label check runs first
        recent: list[tuple[str, str]] = []
        if kind == "recalibrate" and champion is not None:
            since = read_manifest(champion, verify=False).config.get("lineage", {}).get("feedback_watermark", 0)
            recent = (await clean_training_rows(self.feedback, classes, since_seq=since, hygiene=False)).rows
        await self.store.update(
            run["run_id"],
            feedback_watermark=rows.watermark,
            champion_version=champion.name if champion else None,
            progress=f"{len(rows.rows)} clean corrections ({rows.excluded or 'none'} excluded)",
        )
        return JobSpec(
            run_id=run["run_id"],
            kind=kind,
            work_dir=s.models_root / ".runs" / run["run_id"],
            name=read_manifest(champion, verify=False).name if champion else s.models_root.name,
            champion=champion,
            base_data=s.trainer_data,
            text_col=s.trainer_text_col,
            label_col=s.trainer_label_col,
            base_limit=s.trainer_base_limit,
            corrections=rows.rows,
            recent=recent,
            configs=s.config_files(),
            folds=s.trainer_folds,
            llm_min_corrections=s.trainer_llm_min_corrections,
            gate=s.gate_config(),
            feedback_watermark=rows.watermark,
        )

    async def _execute(self, run: dict[str, Any]) -> None:
        run_id, started = run["run_id"], time.perf_counter()
        self._current = run_id
        try:
            spec = await self._spec(run, self.champion())
            if run_id in self._cancelled:
                return
            self._job = JobProcess(spec, lambda message: self._progress(run_id, message))
            result = await self._job.run()
        except JobFailed as exc:
            if run_id not in self._cancelled:
                await self.finish(run_id, "failed", error=str(exc)[:4000])
            return
        except Exception as exc:  # noqa: BLE001 - record why; the worker goes on with the next run
            log.exception("trainer: run %s failed", run_id)
            await self.finish(run_id, "failed", error=f"{type(exc).__name__}: {exc}"[:4000])
            return
        finally:
            self._current, self._job = None, None
            if run_id in self._cancelled:
                shutil.rmtree(self.settings.models_root / ".runs" / run_id, ignore_errors=True)
        await self._conclude(run_id, result, time.perf_counter() - started)

    async def _conclude(self, run_id: str, result: dict[str, Any], seconds: float) -> None:
        """Record the gate's decision; if it passed, publish the candidate or hold it in shadow first."""
        gate, durations = result["gate"], {**result["durations"], "total_s": seconds}
        common = {"gate": gate, "metrics": result["metrics"], "data": result["data"], "durations": durations}
        await self.store.update(run_id, status="gated", candidate_version=result["version"], **common)
        if not gate["passed"]:
            await self.finish(run_id, "rejected", progress=summary_line(gate))
            return
        candidate = Path(result["candidate"])
        if self.settings.trainer_shadow_texts > 0:
            await self.rollout.enter_shadow(run_id, candidate, self.champion(), summary_line(gate))
            return
        await self.promote(run_id, candidate, {}, summary_line(gate))

    async def promote(self, run_id: str, candidate: Path, rollout: dict[str, Any], progress: str) -> None:
        """Publish a run's candidate: under the model root, `current` re-pointed, announced; watched if asked."""
        previous = self.champion()
        target = await asyncio.to_thread(registry.promote, self.settings.models_root, candidate, run_id=run_id)
        await self.bus.publish([registry.announcement(target, self.settings.bundle_key)])
        shutil.rmtree(candidate.parent.parent, ignore_errors=True)  # the run's work directory
        watch = self.rollout.watching(previous.name if previous else None)
        rollout = {**rollout, "watch": watch} if watch else rollout
        fields = {"published_version": target.name, "progress": progress, "rollout": rollout or None}
        await self.finish(run_id, "published", **fields)

    async def _progress(self, run_id: str, message: str) -> None:
        log.info("trainer: run %s: %s", run_id, message)
        if run_id not in self._cancelled:
            await self.store.update(run_id, progress=message[:1000])

    async def finish(self, run_id: str, status: str, **fields: Any) -> None:
        """Record a run's final status."""
        assert status in FINAL
        await self.store.update(run_id, status=status, finished_at=datetime.now(UTC), **fields)
        telemetry.TRAINING_RUNS.labels(status).inc()
        log.info("trainer: run %s %s", run_id, status)
