"""Issue 19, cache poisoning: a decision is cached only under the content it was made for, so one text id sent
with two texts cannot make another tenant's text answered with the first text's decision."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from flockwatch.common.events import TextSubmitted
from flockwatch.gateway.cache import PredictionCache, text_hash
from flockwatch.gateway.settings import GatewaySettings

from tests.security.support import (
    HAM,
    REDIS,
    SPAM,
    cached_keys,
    decision,
    fake_arbiter,
    fake_bundle,
    key_prefix,
    tenants,
    until,
)
from tests.stack import stack


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with key_prefix("security") as name:
        yield name


async def test_a_text_id_reused_for_another_text_does_not_poison_another_tenants_answer(
    tmp_path: Path, prefix: str
) -> None:
    people = tenants(tmp_path)
    cache = {"gateway_cache_url": REDIS, "gateway_cache_prefix": prefix, "auth_tokens_file": people.path}
    # a pipeline slow enough that the second text reaches the gateway before the first one's decision
    async with stack(fake_bundle(tmp_path / "bundle"), ["gateway"], extra=fake_arbiter(0.3), **cache) as (client, _):
        benign = await client.post("/texts", json={"text": HAM, "text_id": "x"}, headers=people.alice)
        swapped = await client.post("/texts", json={"text": SPAM, "text_id": "x"}, headers=people.alice)
        await until(lambda: cached_keys(prefix), "the benign decision cached")
        other = await client.post("/predict", json={"text": SPAM}, headers=people.bob)
    assert benign.status_code == 202
    assert swapped.status_code == 409
    assert other.status_code == 200
    assert (other.json()["prediction"], other.json()["cached"]) == ("spam", False)


async def test_the_cache_keeps_no_decision_for_an_id_looked_up_with_two_texts(tmp_path: Path, prefix: str) -> None:
    settings = GatewaySettings(
        _env_file=None, model_dir=fake_bundle(tmp_path), gateway_cache_url=REDIS, gateway_cache_prefix=prefix
    )
    first = TextSubmitted(message_id="text:x", text_id="x", text=HAM)
    second = TextSubmitted(message_id="text:x", text_id="x", text=SPAM)
    async with PredictionCache(settings) as cache:
        assert await cache.lookup([first]) == [] and await cache.lookup([second]) == []
        await cache.store([decision("x", "ham")])  # decided once: for whichever text the pipeline saw first
        retried = TextSubmitted(message_id="text:y", text_id="y", text=HAM)
        assert await cache.lookup([retried]) == [] and await cache.lookup([retried]) == []  # the same text twice
        await cache.store([decision("y", "ham")])
    assert await cached_keys(prefix) == [f"{prefix}:{cache.versions.digest}:{text_hash(retried)}"]  # type: ignore[union-attr]


@pytest.mark.parametrize(("scope", "bob_hits"), [("tenant", False), ("shared", True)])
async def test_a_cache_hit_tells_one_tenant_nothing_of_another_unless_shared(
    tmp_path: Path, prefix: str, scope: str, bob_hits: bool
) -> None:
    """Tenant scope (the default): alice's cached text is decided afresh for bob, so neither the `cached` flag
    nor the latency tells bob that alice sent it; shared scope: one cache, bob hits alice's entry."""
    people = tenants(tmp_path)
    cache = {"gateway_cache_url": REDIS, "gateway_cache_prefix": prefix, "auth_tokens_file": people.path}
    async with stack(
        fake_bundle(tmp_path / "bundle"), ["gateway"], extra=fake_arbiter(0.0), gateway_cache_scope=scope, **cache
    ) as (client, _):
        first = await client.post("/predict", json={"text": SPAM}, headers=people.alice)
        await until(lambda: cached_keys(prefix), "alice's decision cached")
        again = await client.post("/predict", json={"text": SPAM}, headers=people.alice)
        bob = await client.post("/predict", json={"text": SPAM}, headers=people.bob)
    assert first.json()["cached"] is False and again.json()["cached"] is True  # alice's own repeat: a hit
    assert bob.status_code == 200 and bob.json()["cached"] is bob_hits
