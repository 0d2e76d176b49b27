"""Issue 19, `/metrics` cheap: each scrape of the feedback service's open `/metrics` ran the review, rule and
reviewer aggregates over Postgres (16 anonymous scrapers raised `POST /feedback` p50 from 14 to 368 ms). The
aggregates are computed in the background, once per interval, and a scrape reads them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from flockwatch.feedback.api import create_app
from flockwatch.feedback.app import FeedbackService

from tests.feedback_events import decision, text, vote
from tests.integration.feedback_support import eventually, fresh_schema, running_service
from tests.security.support import until

SPAM_P = {"ham": 0.1, "spam": 0.9}


class Counted:
    """Counts the calls of the store's one whole-table read that every aggregate starts from."""

    def __init__(self, service: FeedbackService) -> None:
        self.calls = 0
        self._read = service.store.corrections

        async def corrections(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await self._read(*args, **kwargs)

        service.store.corrections = corrections


@pytest.fixture
async def slow_refresh() -> AsyncIterator[FeedbackService]:
    async with fresh_schema() as schema, running_service(schema, feedback_metrics_interval_s=3600) as svc:
        yield svc


async def test_many_scrapes_within_an_interval_compute_the_aggregates_at_most_once(
    slow_refresh: FeedbackService,
) -> None:
    reads = Counted(slow_refresh)  # after start: the first background computation may or may not have run
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(slow_refresh)), base_url="http://f") as c:
        for _ in range(20):
            assert (await c.get("/metrics")).status_code == 200
    computations = reads.calls / 3  # one computation reads the corrections three times (rules, queue, groups)
    assert computations <= 1, f"{reads.calls} reads of the corrections for 20 scrapes"


async def test_the_gauges_follow_the_data_in_the_background() -> None:
    async with fresh_schema() as schema, running_service(schema, feedback_metrics_interval_s=0.1) as svc:
        texts = [text(f"r{i}", f"claim your prize {i}") for i in range(4)]
        votes = [decision(f"r{i}", "spam", [vote(f"r{i}", "regex", SPAM_P, ("spam-prize-claim",))]) for i in range(4)]
        await svc.bus.publish([*texts, *votes])
        transport = httpx.ASGITransport(app=create_app(svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://f") as c:
            await eventually(lambda: _has(c, 'flockwatch_rule_fires{rule="spam-prize-claim"} 4.0'))
            await c.post("/feedback", json={"text_id": "r0", "label": "ham", "reviewer_id": "ann"})
            await until(lambda: _has(c, 'flockwatch_rule_precision{rule="spam-prize-claim"} 0.0'), "precision gauge")
        assert svc.gauges.runs >= 2


async def _has(client: httpx.AsyncClient, line: str) -> bool:
    return line in (await client.get("/metrics")).text
