"""The arbiter when publishing a decision fails: the claim's lease ends, the text is decided again, exactly once.

The policy is the cascade test's synthetic one (cascade off); the bus is the in-process one whose first
publish carrying decisions raises, as a broker outage or a crash between claim and publish would.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from flockwatch.arbiter.app import ArbiterService
from flockwatch.arbiter.config import CascadeConfig
from flockwatch.arbiter.join import JoinStore, MemoryJoinStore, RedisJoinStore
from flockwatch.arbiter.settings import ArbiterSettings
from flockwatch.common.bus import Ack
from flockwatch.common.bus_memory import MemoryBus
from flockwatch.common.events import Decision, Event, TextSubmitted

from tests.integration.test_arbiter_cascade import CHEAP, bundle, one_tier_data
from tests.unit.test_arbiter_policy import CLASSES, vote

URL = "redis://127.0.0.1:6379/9"
LEASE_S = 1.0  # short, but well above a publish-and-confirm on a loaded 2-core box


class FlakyBus(MemoryBus):
    """The in-process bus, except that the first publish carrying decisions fails."""

    def __init__(self, settings: ArbiterSettings) -> None:
        super().__init__(settings)
        self.lost: list[str] = []  # the texts whose decisions the failed publish carried
        self.published: list[str] = []  # the texts of the decisions published, one entry per publish

    async def publish(self, events: Sequence[Event], *, ack: Ack | None = None) -> None:
        decided = [e.text_id for e in events if isinstance(e, Decision)]
        if decided and not self.lost:
            self.lost = decided
            raise ConnectionError("broker unavailable")
        self.published += decided
        await super().publish(events, ack=ack)


def cheap_votes(n: int, voters: Sequence[str]) -> list[Event]:
    """The synthetic cheap voters' votes on texts t0 … t{n-1}."""
    probs = one_tier_data(n, 23)[0]
    out: list[Event] = []
    for i in range(n):
        for v in voters:
            p = probs[v][i]
            out.append(
                vote(v, None if np.isnan(p).any() else dict(zip(CLASSES, p.tolist(), strict=True)), text_id=f"t{i}")
            )
    return out


@pytest.fixture(scope="module")
def policy_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cascade = CascadeConfig(voters=["llm"], budget=0.3, deadline_ms=300)
    return bundle(tmp_path_factory.mktemp("lease"), cascade, one_tier_data)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[JoinStore]:
    """A join store with a short lease; the Redis one under its own prefix, dropped afterwards."""
    if request.param == "memory":
        yield MemoryJoinStore(lease_s=LEASE_S)
        return
    prefix = f"fw:test:{uuid.uuid4().hex[:8]}:"
    yield RedisJoinStore(URL, prefix, lease_s=LEASE_S)
    cleanup = aioredis.from_url(URL)
    await cleanup.delete(*[k async for k in cleanup.scan_iter(f"{prefix}*")] or ["none"])
    await cleanup.aclose()


@pytest.mark.parametrize("path", ["votes", "deadline"])
async def test_a_failed_publish_still_ends_in_exactly_one_decision_per_text(
    policy_bundle: Path, store: JoinStore, path: str
) -> None:
    """`votes`: every voter answered, the vote handler's publish fails; `deadline`: one voter, the ticker's."""
    n = 8
    deadline_ms = 5000 if path == "votes" else 200  # long enough that only the lease can bring the decision back
    settings = ArbiterSettings(
        model_dir=policy_bundle, bus_url="memory://", arbiter_deadline_ms=deadline_ms, arbiter_cascade=False
    )
    bus = FlakyBus(settings)
    arbiter = ArbiterService(bus, settings)
    arbiter.store = store
    await arbiter.start()
    async with bus:
        await bus.publish([TextSubmitted(message_id=f"m{i}", text_id=f"t{i}", text=f"text {i}") for i in range(n)])
        await bus.publish(cheap_votes(n, CHEAP if path == "votes" else CHEAP[:1]))
        for _ in range(500):
            if len(bus.published) >= n:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(LEASE_S + 0.2)  # confirmed texts are not decided again
    await arbiter.stop()
    assert bus.lost, "the first publish of decisions must have failed"
    assert sorted(bus.published) == sorted(f"t{i}" for i in range(n))
