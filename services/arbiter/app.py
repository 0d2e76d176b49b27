"""Arbiter service: joins the votes of each text (with a deadline) and publishes one decision per text."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from flockwatch.arbiter.conformal import load_sets
from flockwatch.arbiter.join import JoinStore, MemoryJoinStore, Ready, RedisJoinStore, Submitted
from flockwatch.arbiter.liveness import VoterWatch
from flockwatch.arbiter.model import ArbiterPolicy, DecideItem, Escalation
from flockwatch.arbiter.settings import ArbiterSettings
from flockwatch.common import heap, telemetry, topics
from flockwatch.common.announcements import Announcements
from flockwatch.common.artifacts import ArtifactError, load_json, read_manifest, verified_file
from flockwatch.common.bus import Bus
from flockwatch.common.events import Decision, Event, ModelPublished, TextSubmitted, Vote, VoteRequested
from flockwatch.common.service import Service
from flockwatch.common.slices import SliceConfig

log = logging.getLogger(__name__)
ARTIFACT = "arbiter.json"
IDLE_TICK_S = 0.1  # the longest the deadline loop sleeps (decided texts wait this long at most to be confirmed)


def load_policy(model_dir: Path) -> ArbiterPolicy:
    """The bundle's arbiter policy: stacker and thresholds (JSON), conformal calibrators, slices; all verified."""
    files = read_manifest(model_dir, verify=False).files
    slices = SliceConfig.load(verified_file(model_dir, "slices.yaml")) if "slices.yaml" in files else None
    sets = load_sets(model_dir)
    return ArbiterPolicy.from_dict(load_json(model_dir, ARTIFACT), sets, slices)


class ArbiterService(Service):
    """Decides each text once: when every expected voter has voted, or at its deadline."""

    name = "arbiter"

    def __init__(self, bus: Bus, settings: ArbiterSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.policy: ArbiterPolicy | None = None
        self.store: JoinStore = (
            RedisJoinStore(settings.shared_state_url, lease_s=settings.arbiter_lease_ms / 1000)
            if settings.shared_state_url
            else MemoryJoinStore(lease_s=settings.arbiter_lease_ms / 1000)
        )
        self._ticker: asyncio.Task[None] | None = None
        self._unconfirmed: list[str] = []  # texts whose decisions are published, confirmed by the next tick
        # a voter counts as down only after a silence longer than the deadline: never sooner than a text would have
        # stopped waiting for it anyway (a voter reloading its model, or starved of CPU for a moment, is not down)
        silence_ms = max(settings.arbiter_voter_silence_ms, settings.arbiter_deadline_ms)
        self.voters = VoterWatch(silence_ms / 1000, settings.arbiter_max_extra_wait_ms / 1000)
        bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=self.name)(self.on_texts)
        bus.subscribe(topics.VOTE_CAST, Vote, group=self.name, published=self.published)(self.on_votes)
        self.announcements = Announcements(settings, self.name)
        bus.subscribe(topics.MODEL_PUBLISHED, ModelPublished, group=self.name, broadcast=True)(self.on_model)

    @property
    def deadline_s(self) -> float:
        """Seconds a text waits for its votes."""
        return self.settings.arbiter_deadline_ms / 1000

    async def start(self) -> None:
        policy: ArbiterPolicy = await asyncio.to_thread(load_policy, self.settings.model_dir)
        self._use(policy)
        self._ticker = asyncio.create_task(self._tick(), name="arbiter-deadlines")

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._ticker, 5.0)  # a cancelled Redis call must not block shutdown
        with contextlib.suppress(Exception):  # else their leases end and the texts are decided again
            await asyncio.wait_for(self._confirm_published(), 2.0)
        try:  # a connection held by the cancelled ticker must not block shutdown
            await asyncio.wait_for(self.store.close(), 2.0)
        except TimeoutError:
            log.warning("arbiter: join store did not close within 2 s")

    async def on_texts(self, msgs: list[TextSubmitted]) -> list[Event]:
        """Start each text's deadline clock (from now: see `JoinStore.add_texts`); keep its text for slices and
        escalation, and its submission time for the decision's latency."""
        newest = max(m.timestamp.timestamp() for m in msgs)
        self.voters.saw_texts(time.time() - newest, newest)
        items = [Submitted(m.text_id, m.timestamp.timestamp(), m.text, dict(m.metadata)) for m in msgs]
        await self.store.add_texts(items, self.deadline_s)
        return []

    async def on_votes(self, votes: list[Vote]) -> list[Event]:
        """Store votes; decide (or escalate) the texts that are now complete. The bus publishes the outcomes with
        the votes' acknowledgement (one round trip), then `published` has their claims confirmed."""
        assert self.policy is not None
        now = time.time()
        lags: dict[str, float] = {}  # per voter: how long ago the freshest text it voted on was submitted
        reached: dict[str, float] = {}  # … and when (epoch seconds)
        for vote in votes:
            if vote.submitted_at is not None:
                at = vote.submitted_at.timestamp()
                reached[vote.voter] = max(at, reached.get(vote.voter, at))
                lags[vote.voter] = now - reached[vote.voter]
            else:
                lags.setdefault(vote.voter, 0.0)
        self.voters.saw_votes(lags, reached)
        expected = len(self.voters.live(self.policy.first_stage_voters))
        ready = await self.store.add_votes(votes, expected, self.deadline_s)
        try:
            return await self._decide(ready)
        except Exception:  # noqa: BLE001 - the votes are stored: the deadline path decides once the claims' leases end
            log.exception("arbiter: deciding %d texts failed; they are decided again after their lease", len(ready))
            return []

    async def published(self, events: Sequence[Event]) -> None:
        """The decisions the vote handler returned are on the bus: their claims are confirmed by the next tick,
        for all the batches of a tick at once (a claim's lease is far longer than a tick). A publish that failed
        never gets here: its claims end with their leases and the texts are decided again."""
        self._unconfirmed += [e.text_id for e in events if isinstance(e, Decision)]

    def _use(self, policy: ArbiterPolicy) -> None:
        """Put a loaded policy in force; a policy that abstains on every text is said loudly, not silently."""
        self.policy = policy
        telemetry.set_model_version(self.name, policy.version)
        state = policy.certification
        telemetry.MODEL_CERTIFIED.set(1 if state["certified"] else 0)
        if not state["certified"]:
            log.warning("arbiter: model %s: %s", policy.version, state["warning"])

    async def on_model(self, msgs: list[ModelPublished]) -> list[Event]:
        """Hot reload of the arbiter policy; a refused artifact keeps the current one."""
        for msg, path in await self.announcements.admit(m for m in msgs if m.component in ("bundle", self.name)):
            try:
                policy = await asyncio.to_thread(load_policy, path)
            except (ArtifactError, OSError, ValueError, TypeError) as exc:
                log.error("arbiter: refused model %s: %s", msg.version, exc)
                continue
            self._use(policy)
            heap.settle()  # the old policy collected, the new one frozen
        return []

    async def _decide(self, ready: list[Ready]) -> list[Event]:
        """Decisions for the ready texts; escalated ones go back to the store to wait for the cascade vote."""
        assert self.policy is not None
        policy, now = self.policy, time.time()
        items = [
            DecideItem(
                r.text_id,
                r.votes,
                r.text,
                r.metadata,
                max(0.0, (now - r.submitted_at) * 1000) if r.submitted_at else 0.0,
                may_escalate=self.settings.arbiter_cascade,
                rounds=r.rounds,
            )
            for r in ready
        ]
        out: list[Event] = []
        deadline_ms = policy.config.cascade.deadline_ms
        for r, outcome in zip(ready, policy.decide_many(items), strict=True):
            if isinstance(outcome, Escalation):
                await self.store.reopen(r, len({v.voter for v in r.votes}) + len(outcome.voters), deadline_ms / 1000)
                text = r.text or ""
                out.append(
                    VoteRequested(
                        message_id=VoteRequested.id_for(r.text_id, outcome.tier),
                        text_id=r.text_id,
                        text=text,
                        voters=outcome.voters,
                        reason=outcome.reason,
                        deadline_ms=deadline_ms,
                        tier=outcome.tier,
                    )
                )
                telemetry.DECISIONS.labels("escalated", "pending", "").inc()
                for voter in outcome.voters:
                    telemetry.CASCADE_REQUESTS.labels(str(outcome.tier), voter).inc()
                continue
            decision = outcome.model_copy(update={"arbiter_instance": self.settings.instance_id})
            answered = not decision.abstain and decision.prediction is not None
            telemetry.DECISIONS.labels(
                decision.path, "answer" if answered else "abstain", decision.prediction if answered else ""
            ).inc()
            telemetry.DECISION_SECONDS.labels(decision.path).observe(decision.latency_ms / 1000)
            out.append(decision)
        return out

    async def _publish(self, events: list[Event]) -> None:
        """Publish, and only then confirm the decided texts (with any the vote path left for this tick): a claim
        left unconfirmed is claimed again later."""
        await self.bus.publish(events)
        await self.published(events)
        await self._confirm_published()

    async def _confirm_published(self) -> None:
        confirming, self._unconfirmed = self._unconfirmed, []
        try:
            await self.store.confirm(confirming)
        except BaseException:
            self._unconfirmed = confirming + self._unconfirmed  # the next tick tries again
            raise

    def _pause_s(self, cutoff: float) -> float:
        """How long the deadline loop sleeps: until the earliest deadline the store knows of, at least a tick,
        at most `IDLE_TICK_S` and half the shortest deadline a text may get meanwhile (at low load it asked Redis
        a hundred times a second for nothing, and that CPU is on the critical path of a two-core box)."""
        tick_s = self.settings.arbiter_tick_ms / 1000
        shortest = self.deadline_s
        if self.policy is not None:
            shortest = min(shortest, self.policy.config.cascade.deadline_ms / 1000)
        longest = max(tick_s, min(IDLE_TICK_S, shortest / 2))
        known = self.store.next_deadline
        return longest if known is None else min(longest, max(tick_s, known - cutoff))

    async def _tick(self) -> None:
        failures = 0  # in a row: while Redis is down the loop backs off (to 2 s) and logs the traceback once
        pause = 0.0
        while True:
            tick_s = self.settings.arbiter_tick_ms / 1000
            await asyncio.sleep(min(2.0, tick_s * 2**failures) if failures else pause)
            try:
                await self._confirm_published()
                voters = self.policy.first_stage_voters if self.policy else []
                cutoff = time.time() - self.voters.extra_wait_s(voters)
                ready = await self.store.pop_expired(cutoff)
                pause = tick_s if ready else self._pause_s(cutoff)
                if ready:
                    await self._publish(await self._decide(ready))
            except Exception as exc:  # noqa: BLE001 - the deadline loop must survive a broker hiccup
                if not failures:
                    log.exception("arbiter: deadline check failed; retrying with backoff")
                else:
                    log.warning("arbiter: deadline check failed again (%s: %s)", type(exc).__name__, exc)
                failures = min(failures + 1, 16)
            else:
                if failures:
                    log.info("arbiter: deadline checks work again after %d failures", failures)
                failures = 0
