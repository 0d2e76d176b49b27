"""What every service shares: a lifecycle, and for voters the batch vote handler and hot reload."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, cast

from flockwatch.common import heap, telemetry, topics
from flockwatch.common.announcements import Announcements
from flockwatch.common.artifacts import ArtifactError, load_json
from flockwatch.common.bus import Bus
from flockwatch.common.events import ModelPublished, TextSubmitted, Vote, VoteRequested
from flockwatch.common.settings import CommonSettings
from flockwatch.common.voting import Opinion, to_vote

log = logging.getLogger(__name__)
# A batch expected to take less than this many ms is scored on the event loop: a voter's loop only reads and
# publishes, so a stall that short costs nothing, while a hand-off to a worker thread and back costs CPU and
# latency on a busy box (a tenth of the regex voter's CPU). Slower calls (the LLM, huge batches) take a thread.
INLINE_MS = 50.0


class Service(ABC):
    """A service registers its handlers on a bus when built and loads its resources in `start`."""

    name: str

    @abstractmethod
    async def start(self) -> None:
        """Load artifacts and open resources (before the bus delivers anything)."""

    async def stop(self) -> None:  # noqa: B027 - optional: a service without resources has nothing to release
        """Release resources."""


class VoterCore(ABC):
    """A loaded voter model: the names it votes under, its version, and a batch predict."""

    version: str
    voters: Sequence[str]

    @abstractmethod
    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        """One opinion per text for each voter name."""


class VoterService(Service):
    """Votes on batches of texts with one vectorized call, reloads on ModelPublished.

    mode "always": on every submitted text; "cascade": only on the arbiter's VoteRequested naming one of its
    voters (an expensive voter asked when the cheap ones are unsure); "auto": as the bundle in force says —
    on every text unless its policy keeps this voter in a cascade tier (training may promote a tier to
    every text within a CPU budget), and always on requests.
    """

    def __init__(
        self, bus: Bus, settings: CommonSettings, mode: Literal["always", "cascade", "auto"] = "always"
    ) -> None:
        self.settings = settings
        self.mode = mode
        self.core: VoterCore | None = None
        self.every_text = mode != "cascade"  # "auto": set from each bundle on load
        self.expired = 0  # cascade requests that arrived past their deadline (not answered)
        self._cost: tuple[VoterCore, float] | None = None  # a core's smoothed ms per text (unknown: a thread)
        self.announcements = Announcements(settings, self.name)
        if mode != "cascade":
            bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=self.name)(self.on_texts)
        if mode != "always":
            bus.subscribe(topics.VOTE_REQUESTED, VoteRequested, group=self.name)(self.on_requests)
        bus.subscribe(topics.MODEL_PUBLISHED, ModelPublished, group=self.name, broadcast=True)(self.on_model)

    @abstractmethod
    def load(self, model_dir: Path) -> VoterCore | None:
        """Load (and verify) this voter's part of a model bundle; None when the bundle has none."""

    async def start(self) -> None:
        self.core = await asyncio.to_thread(self.load, self.settings.model_dir)
        self._announce(self.settings.model_dir)

    def _announce(self, model_dir: Path) -> None:
        if self.core is None:
            log.warning("%s: the bundle in %s has nothing for this voter; it will not vote", self.name, model_dir)
            return
        if self.mode == "auto":
            self.every_text = not set(self.core.voters) & cascade_voters(model_dir)
        when = "every text" if self.every_text else "when the arbiter asks"
        log.info("%s: loaded %s (%s), votes on %s", self.name, self.core.version, ", ".join(self.core.voters), when)
        telemetry.set_model_version(self.name, self.core.version)

    async def on_texts(self, msgs: list[TextSubmitted]) -> list[Vote]:
        """Vote on a batch of texts (in "auto" mode only while the bundle runs this voter on every text)."""
        core = self.core
        if core is None or not self.every_text:
            return []
        return await self._vote(core, msgs)

    async def on_requests(self, msgs: list[VoteRequested]) -> list[Vote]:
        """Vote on the texts the arbiter asked this voter about, skipping requests already past their deadline."""
        core = self.core
        if core is None:
            return []
        now = datetime.now(UTC)
        wanted = [m for m in msgs if set(m.voters) & set(core.voters)]
        fresh = [m for m in wanted if (now - m.timestamp).total_seconds() * 1000 < m.deadline_ms]
        self.expired += len(wanted) - len(fresh)
        telemetry.REQUESTS_EXPIRED.labels(self.name).inc(len(wanted) - len(fresh))
        if not fresh:
            return []
        # to_vote reads only the text id, which a VoteRequested carries too
        return await self._vote(core, cast(list[TextSubmitted], fresh))

    async def _vote(self, core: VoterCore, msgs: list[TextSubmitted]) -> list[Vote]:
        texts = [m.text for m in msgs]
        start = time.perf_counter()
        cost = self._cost[1] if self._cost and self._cost[0] is core else None  # unknown for a new core
        if cost is not None and len(texts) * cost <= INLINE_MS:
            opinions = core.predict(texts)
        else:  # a long (or not yet measured) call in a worker thread: the loop keeps reading and publishing
            opinions = await asyncio.to_thread(core.predict, texts)
        per_text_ms = (time.perf_counter() - start) * 1000 / len(msgs)
        self._cost = (core, per_text_ms if cost is None else cost + 0.2 * (per_text_ms - cost))  # smoothed
        votes = [
            to_vote(msg, voter, core.version, opinion, per_text_ms)
            for voter, column in opinions.items()
            for msg, opinion in zip(msgs, column, strict=True)
        ]
        for vote in votes:
            if vote.abstain or not vote.probabilities:
                telemetry.VOTES.labels(vote.voter, "abstain", "").inc()
            else:
                top = max(vote.probabilities, key=vote.probabilities.__getitem__)
                telemetry.VOTES.labels(vote.voter, "vote", top).inc()
        return votes

    async def on_model(self, msgs: list[ModelPublished]) -> list[Vote]:
        """Hot reload: swap in a newly published bundle; keep the old one if the new one is refused."""
        for msg, path in await self.announcements.admit(m for m in msgs if m.component in ("bundle", self.name)):
            try:
                self.core = await asyncio.to_thread(self.load, path)
            except (ArtifactError, OSError, ValueError, TypeError) as exc:
                log.error("%s: refused model %s from %s: %s", self.name, msg.version, path, exc)
                continue
            self._announce(path)
            heap.settle()  # the old model collected, the new one frozen
        return []


def cascade_voters(model_dir: Path) -> set[str]:
    """The voters a bundle's arbiter asks only on escalation (its policy's cascade tiers; none if unreadable)."""
    try:
        tiers = load_json(model_dir, "arbiter.json")["config"]["cascade"]["tiers"]
        return {str(v) for tier in tiers for v in tier["voters"]}
    except (ArtifactError, OSError, KeyError, TypeError, ValueError):
        return set()
