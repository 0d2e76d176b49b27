"""Admission control and the batch endpoint: beyond the in-flight limit the gateway refuses at once with 503 +
Retry-After; every accepted text gets exactly one decision and no refused text is ever published."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from flockwatch.common import topics
from flockwatch.common.events import Decision, Event, TextSubmitted

from tests.e2e.test_embedded import SPAM, collector, settle
from tests.stack import stack

REDIS = "redis://127.0.0.1:6379/5"


async def test_batch_returns_decisions_in_request_order(sms_bundle: Path) -> None:
    texts = [SPAM, "are we still on for lunch today?", "ok see you at 5"]
    async with stack(sms_bundle) as (client, _):
        body = {"texts": [{"text": t, "text_id": f"b{i}"} for i, t in enumerate(texts)]}
        response = await client.post("/predict/batch", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert [d["text_id"] for d in result["decisions"]] == ["b0", "b1", "b2"] and result["pending"] == []
    assert result["decisions"][0]["prediction"] == "spam" and result["decisions"][1]["prediction"] == "ham"


@pytest.mark.parametrize(
    ("texts", "status", "message"),
    [
        ([], 422, "at least 1 item"),
        (
            [{"text": "a", "text_id": "x"}, {"text": "b", "text_id": "x"}],
            409,
            "texts[1]: text_id 'x' is also texts[0]'s",
        ),
        ([{"text": "fine"}, {"text": "   "}], 422, "texts[1]: text is empty"),
        ([{"text": "fine"}, {"text": "a" * 20}], 413, "texts[1]: text has 20 characters"),
        ([{"text": "a"}] * 1001, 422, "at most 1000 items"),
    ],
)
async def test_bad_batches_are_refused_whole_with_a_reason(
    sms_bundle: Path, texts: list[dict[str, str]], status: int, message: str
) -> None:
    seen: list[Event] = []
    async with stack(
        sms_bundle, ["gateway"], extra=collector(topics.TEXT_SUBMITTED, TextSubmitted, seen), gateway_max_text_chars=10
    ) as (client, _):
        response = await client.post("/predict/batch", json={"texts": texts})
        await asyncio.sleep(0.1)
    assert response.status_code == status and message in response.json()["detail"], response.text
    assert seen == []  # nothing of a refused batch was published


async def overload(client: httpx.AsyncClient, n: int) -> dict[str, httpx.Response]:
    """`n` single-text requests at once, plus two batches; responses by text id (a batch's under each id)."""
    singles = {
        f"s{i}": client.post("/predict", json={"text": f"text number {i}", "text_id": f"s{i}"}) for i in range(n)
    }
    batches = {
        tuple(f"b{j}-{i}" for i in range(8)): client.post(
            "/predict/batch",
            json={"texts": [{"text": f"batch {j} text {i}", "text_id": f"b{j}-{i}"} for i in range(8)]},
        )
        for j in range(2)
    }
    done = await asyncio.gather(*singles.values(), *batches.values())
    out = dict(zip(singles, done[:n], strict=True))
    for ids, response in zip(batches, done[n:], strict=True):
        out |= dict.fromkeys(ids, response)
    return out


@pytest.mark.parametrize("bus_url", ["memory://", pytest.param(REDIS, marks=pytest.mark.connected)])
async def test_overload_is_refused_cleanly_and_nothing_accepted_is_lost(sms_bundle: Path, bus_url: str) -> None:
    if bus_url.startswith("redis"):
        await aioredis.from_url(bus_url).flushdb()
    decided: list[Event] = []
    # every decision waits for its deadline (no voter runs), so texts pile up in flight
    async with stack(
        sms_bundle,
        ["gateway", "arbiter"],
        extra=collector(topics.DECISION_MADE, Decision, decided),
        bus_url=bus_url,
        arbiter_deadline_ms=300,
        gateway_max_in_flight=20,
        gateway_shed_after_ms=0,  # this test is about the in-flight bound alone
    ) as (client, _):
        responses = await overload(client, 120)
        accepted = {t for t, r in responses.items() if r.status_code == 200}
        refused = {t for t, r in responses.items() if r.status_code == 503}
        await settle(lambda: len(decided) >= len(accepted), seconds=10)
        await asyncio.sleep(0.5)  # room for a duplicate to show up
    assert accepted and refused and accepted | refused == set(responses), Counter(
        r.status_code for r in responses.values()
    )
    for text_id in refused:
        response = responses[text_id]
        assert response.headers["retry-after"] == "1" and "too many texts in flight" in response.json()["detail"]
    counts = Counter(d.text_id for d in decided)  # type: ignore[attr-defined]
    assert set(counts) == accepted and set(counts.values()) == {1}
    # a refused client that retries after Retry-After gets its decision
    async with stack(sms_bundle, ["gateway", "arbiter"], bus_url=bus_url, arbiter_deadline_ms=50) as (client, _):
        retried = await client.post("/predict", json={"text": "text number 0", "text_id": sorted(refused)[0]})
    assert retried.status_code == 200


async def test_new_texts_are_refused_while_the_oldest_in_flight_waits_too_long(sms_bundle: Path) -> None:
    # no voter runs: each text waits the arbiter's deadline, longer than the gateway lets the oldest wait
    async with stack(sms_bundle, ["gateway", "arbiter"], arbiter_deadline_ms=1500, gateway_shed_after_ms=200) as (
        client,
        _,
    ):
        first = asyncio.create_task(client.post("/predict", json={"text": "one"}))
        await asyncio.sleep(0.05)
        early = await client.post("/texts", json={"text": "two"})
        await asyncio.sleep(0.4)
        late = await client.post("/predict", json={"text": "three"})
        assert (await first).status_code == 200
    assert early.status_code == 202
    assert late.status_code == 503 and "the pipeline is behind" in late.json()["detail"]
    assert late.headers["retry-after"] == "1"
