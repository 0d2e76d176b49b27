"""Arbiter service: joins the votes of each text (with a deadline) and publishes one decision per text."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from flockwatch.arbiter.join import JoinStore, MemoryJoinStore, Ready, RedisJoinStore
from flockwatch.arbiter.model import ArbiterPolicy
from flockwatch.arbiter.settings import ArbiterSettings
from flockwatch.common import telemetry, topics
from flockwatch.common.artifacts import ArtifactError, load_json
from flockwatch.common.bus import Bus
from flockwatch.common.events import Decision, ModelPublished, TextSubmitted, Vote
from flockwatch.common.service import Service

log = logging.getLogger(__name__)
ARTIFACT = "arbiter.json"


def load_policy(model_dir: Path) -> ArbiterPolicy:
    """The bundle's arbiter policy (a JSON file, sha256-verified)."""
    return ArbiterPolicy.from_dict(load_json(model_dir, ARTIFACT))


class ArbiterService(Service):
    """Decides each text once: when every expected voter has voted, or at its deadline."""

    name = "arbiter"

    def __init__(self, bus: Bus, settings: ArbiterSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.policy: ArbiterPolicy | None = None
        self.store: JoinStore = (
            RedisJoinStore(settings.shared_state_url) if settings.shared_state_url else MemoryJoinStore()
        )
        self._ticker: asyncio.Task[None] | None = None
        bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=self.name)(self.on_texts)
        bus.subscribe(topics.VOTE_CAST, Vote, group=self.name)(self.on_votes)
        bus.subscribe(topics.MODEL_PUBLISHED, ModelPublished, group=self.name, broadcast=True)(self.on_model)

    @property
    def deadline_s(self) -> float:
        """Seconds a text waits for its votes."""
        return self.settings.arbiter_deadline_ms / 1000

    async def start(self) -> None:
        self.policy = await asyncio.to_thread(load_policy, self.settings.model_dir)
        telemetry.MODEL_INFO.labels(self.name, self.policy.version).set(1)
        self._ticker = asyncio.create_task(self._tick(), name="arbiter-deadlines")

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        try:  # a connection held by the cancelled ticker must not block shutdown
            await asyncio.wait_for(self.store.close(), 2.0)
        except TimeoutError:
            log.warning("arbiter: join store did not close within 2 s")

    async def on_texts(self, msgs: list[TextSubmitted]) -> list[Decision]:
        """Start each text's deadline clock at its submission time."""
        await self.store.add_texts([(m.text_id, m.timestamp.timestamp()) for m in msgs], self.deadline_s)
        return []

    async def on_votes(self, votes: list[Vote]) -> list[Decision]:
        """Store votes; decide the texts that are now complete."""
        assert self.policy is not None
        ready = await self.store.add_votes(votes, len(self.policy.expected_voters), self.deadline_s)
        return self._decide(ready)

    async def on_model(self, msgs: list[ModelPublished]) -> list[Decision]:
        """Hot reload of the arbiter policy; a refused artifact keeps the current one."""
        for msg in msgs:
            if msg.component in ("bundle", self.name):
                try:
                    self.policy = await asyncio.to_thread(load_policy, Path(msg.path))
                except (ArtifactError, OSError, ValueError) as exc:
                    log.error("arbiter: refused model %s: %s", msg.version, exc)
        return []

    def _decide(self, ready: list[Ready]) -> list[Decision]:
        assert self.policy is not None
        now = time.time()
        decisions = []
        for item in ready:
            arrived = {v.voter for v in item.votes}
            missing = [v for v in self.policy.expected_voters if v not in arrived]
            latency_ms = max(0.0, (now - item.submitted_at) * 1000) if item.submitted_at else 0.0
            decision = self.policy.decide(item.votes, item.text_id, latency_ms, missing).model_copy(
                update={"arbiter_instance": self.settings.instance_id}
            )
            telemetry.DECISIONS.labels(decision.path, "abstain" if decision.abstain else "answer").inc()
            decisions.append(decision)
        return decisions

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.settings.arbiter_tick_ms / 1000)
            try:
                ready = await self.store.pop_expired(time.time())
                if ready:
                    await self.bus.publish(self._decide(ready))
            except Exception:  # noqa: BLE001 - the deadline loop must survive a broker hiccup
                log.exception("arbiter: deadline check failed; retrying")
