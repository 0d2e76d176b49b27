"""The feedback service: bus consumers that store texts, decisions and feedback in Postgres, and the HTTP API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

from flockwatch.common import topics
from flockwatch.common.announcements import Announcements
from flockwatch.common.artifacts import ArtifactError
from flockwatch.common.bus import Bus
from flockwatch.common.datasets import normalize
from flockwatch.common.events import Decision, FeedbackSubmitted, ModelPublished, TextSubmitted
from flockwatch.common.http import EmbeddedServer
from flockwatch.common.service import Service
from flockwatch.feedback import telemetry
from flockwatch.feedback.config import TaskConfig, load_task
from flockwatch.feedback.gauges import Refresher, refresh_gauges
from flockwatch.feedback.migrate import upgrade_async
from flockwatch.feedback.model import assess, voter_outputs
from flockwatch.feedback.pii import scrub
from flockwatch.feedback.settings import FeedbackSettings
from flockwatch.feedback.store import TRANSIENT, DecisionRow, FeedbackRow, FeedbackStore, FireRow, TextRow
from flockwatch.feedback.training import run_hygiene
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)
GROUP = "feedback"


class UnknownLabel(ValueError):
    """Feedback names a class the task does not have."""


class DatabaseUnavailable(ValueError):
    """The configured PostgreSQL cannot be reached or migrated (a bad URL, or the server is down)."""


def feedback_kind(msg: FeedbackSubmitted) -> str:
    """correction, thumbs_up or thumbs_down (a label makes it a correction)."""
    return "correction" if msg.label is not None else f"thumbs_{msg.thumbs}"


class FeedbackService(Service):
    """Consumes texts, decisions and feedback in batches into Postgres; serves the API and review page."""

    name = "feedback"

    def __init__(self, bus: Bus, settings: FeedbackSettings | None = None) -> None:
        self.settings = settings or FeedbackSettings()
        self.bus = bus
        self.task = TaskConfig()
        self._store: FeedbackStore | None = None
        self._server: EmbeddedServer | None = None
        self._hygiene: asyncio.Task[None] | None = None
        self.gauges = Refresher(
            lambda: refresh_gauges(self.store, self.task), self.settings.feedback_metrics_interval_s
        )
        self.hygiene_lock = asyncio.Lock()
        self._new_corrections = 0
        self.http_port: int | None = None
        bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=GROUP)(self.on_texts)
        bus.subscribe(topics.DECISION_MADE, Decision, group=GROUP)(self.on_decisions)
        bus.subscribe(topics.FEEDBACK_SUBMITTED, FeedbackSubmitted, group=GROUP)(self.on_feedback)
        self.announcements = Announcements(self.settings, "feedback")
        bus.subscribe(topics.MODEL_PUBLISHED, ModelPublished, group=GROUP, broadcast=True)(self.on_model)

    @property
    def store(self) -> FeedbackStore:
        """The database (after `start`)."""
        if self._store is None:
            raise RuntimeError("the feedback service is not started")
        return self._store

    async def start(self) -> None:
        s = self.settings
        self.task = await asyncio.to_thread(load_task, s.feedback_labels, s.feedback_rules, s.model_dir)
        try:
            if s.feedback_migrate:
                await upgrade_async(s.feedback_database_url, s.feedback_db_schema)
            self._store = await FeedbackStore.connect(
                s.feedback_database_url, s.feedback_db_schema, s.feedback_pool_size, s.feedback_db_retry_s
            )
        except (*TRANSIENT, SQLAlchemyError) as exc:
            where = s.feedback_database_url.rsplit("@", 1)[-1]  # no password in the message
            raise DatabaseUnavailable(f"feedback: cannot use PostgreSQL at {where}: {exc}") from exc
        log.info("feedback: schema %s ready; task config from %s", s.feedback_db_schema, self.task.source)
        self.gauges.start()
        if s.feedback_serve_http:
            await self._serve_http()

    async def _serve_http(self) -> None:
        from flockwatch.feedback.api import create_app

        self._server = EmbeddedServer.of(create_app(self), self.settings.feedback_host, self.settings.feedback_port)
        self.http_port = await self._server.start("feedback-http")
        log.info("feedback: HTTP on %s:%s (review page at /review)", self.settings.feedback_host, self.http_port)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
        await self.gauges.stop()
        if self._hygiene is not None:
            await asyncio.gather(self._hygiene, return_exceptions=True)
        if self._store is not None:
            await self.store.close()
            self._store = None

    # --- bus handlers ---------------------------------------------------------------------------------

    def text_row(self, msg: TextSubmitted) -> TextRow:
        """A submitted text, scrubbed, with the hash that finds its duplicates."""
        clean = scrub(msg.text, keep_service_numbers=self.settings.feedback_keep_service_numbers)
        digest = hashlib.sha256(normalize(clean.text).encode()).hexdigest()
        return (msg.text_id, clean.text, digest, ",".join(clean.found), msg.timestamp)

    async def on_texts(self, msgs: list[TextSubmitted]) -> list[Any]:
        """Store submitted texts (scrubbed)."""
        rows = [self.text_row(m) for m in msgs]
        await self.store.retrying(lambda: self.store.insert_texts(rows))
        telemetry.ROWS.labels("texts").inc(len(rows))
        return []

    def decision_rows(self, msgs: list[Decision]) -> tuple[list[DecisionRow], list[FireRow]]:
        """Decisions with their review priority, and the rules that fired for each."""
        n_classes = len(self.task.classes or []) or max((len(m.probabilities) for m in msgs), default=2)
        rows: list[DecisionRow] = []
        fires: list[FireRow] = []
        for m in msgs:
            a = assess(m, self.task.harm, n_classes, self.settings.feedback_review_min_set_size)
            voters = voter_outputs(m)
            rows.append(
                (
                    m.text_id,
                    m.prediction,
                    m.confidence,
                    m.abstain,
                    m.abstain_reason,
                    json.dumps(m.prediction_set),
                    json.dumps(m.probabilities),
                    m.path,
                    json.dumps(voters),
                    m.arbiter_version,
                    m.timestamp,
                    a.disagreement,
                    a.harm,
                    a.priority,
                    json.dumps(list(a.reasons)),
                )
            )
            rule_voter = voters.get(self.settings.feedback_rule_voter)
            for rule in dict.fromkeys(rule_voter["evidence"] if rule_voter else []):
                meta = self.task.rules.get(rule)
                fires.append((m.text_id, rule, meta.label if meta else None))
        return rows, fires

    async def on_decisions(self, msgs: list[Decision]) -> list[Any]:
        """Store decisions, their voters' outputs, review priority and the rules that fired."""
        rows, fires = self.decision_rows(msgs)
        await self.store.retrying(lambda: self.store.insert_decisions(rows, fires))
        telemetry.ROWS.labels("decisions").inc(len(rows))
        return []

    def check_label(self, msg: FeedbackSubmitted) -> None:
        """Refuse a label the task does not have."""
        classes = self.task.classes
        if msg.label is not None and classes is not None and msg.label not in classes:
            raise UnknownLabel(f"label {msg.label!r} is not one of {classes}")

    def feedback_row(self, msg: FeedbackSubmitted, source: str) -> FeedbackRow:
        """A feedback message as a row; the note is scrubbed like the texts."""
        note = scrub(msg.note, keep_service_numbers=False).text if msg.note else None
        return (msg.message_id, msg.text_id, msg.label, msg.thumbs, note, msg.reviewer_id, msg.timestamp, source)

    async def on_feedback(self, msgs: list[FeedbackSubmitted]) -> list[Any]:
        """Store feedback (repeats ignored); every `hygiene_every` new corrections, check the labels."""
        for m in msgs:
            self.check_label(m)  # one bad message fails the batch; the bus retries one by one, dead-letters it
        new = await self.store.retrying(lambda: self.store.insert_feedback([self.feedback_row(m, "bus") for m in msgs]))
        self.count_new([m for m in msgs if m.message_id in new], "bus")
        telemetry.FEEDBACK_REPEATS.labels("bus").inc(len(msgs) - len(new))
        return []

    def count_new(self, stored: list[FeedbackSubmitted], source: str) -> None:
        """Metrics for new feedback, and the label check once enough corrections arrived."""
        for m in stored:
            telemetry.FEEDBACK.labels(feedback_kind(m), source).inc()
        self._new_corrections += sum(m.label is not None for m in stored)
        every = self.settings.feedback_hygiene_every
        if every and self._new_corrections >= every and (self._hygiene is None or self._hygiene.done()):
            self._new_corrections = 0
            self._hygiene = asyncio.create_task(self._hygiene_in_background(), name="feedback-hygiene")

    async def hygiene(self) -> dict[str, Any]:
        """Run the label check (one at a time)."""
        async with self.hygiene_lock:
            s = self.settings
            result = await run_hygiene(
                self.store, self.task.classes, s.feedback_hygiene_folds, s.feedback_hygiene_min_rows
            )
            log.info("feedback: hygiene run %s flagged %s of %s", result["run_id"], result["flagged"], result["rows"])
            return result

    async def _hygiene_in_background(self) -> None:
        try:
            await self.hygiene()
        except Exception:  # noqa: BLE001 - a failed check must not take the consumer down; the next one retries
            log.exception("feedback: label hygiene failed")

    async def on_model(self, msgs: list[ModelPublished]) -> list[Any]:
        """A new bundle may bring new labels or rules: reload them (keep the old ones if they fail)."""
        for msg, path in await self.announcements.admit(m for m in msgs if m.component in ("bundle", "regex_voter")):
            try:
                self.task = await asyncio.to_thread(
                    load_task, self.settings.feedback_labels, self.settings.feedback_rules, path
                )
            except (ArtifactError, OSError, ValueError) as exc:
                log.error("feedback: kept the old task config; %s from %s failed: %s", msg.version, path, exc)
        return []
