"""The gateway's prediction cache on the real Redis: repeated texts answered without the bus, invalidated by
`ModelPublished`, only complete decisions of the models in force kept, and predictions unharmed without it."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from flockwatch.common import topics
from flockwatch.common.artifacts import manifest_sha256, read_manifest
from flockwatch.common.bus import Bus
from flockwatch.common.events import Decision, Event, ModelPublished, TextSubmitted, Vote
from flockwatch.gateway.cache import PredictionCache
from flockwatch.gateway.settings import GatewaySettings
from prometheus_client import REGISTRY

from tests.security.support import HAM, REDIS, SPAM, cached_keys, key_prefix, until
from tests.stack import stack


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with key_prefix("cache") as name:
        yield name


def submitted_into(ids: list[str]) -> Callable[[Bus], object]:
    """Register a consumer that notes the id of every text put on the bus."""

    def register(bus: Bus) -> None:
        @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group="cache-test")
        async def note(msgs: list[TextSubmitted]) -> list[Event]:
            ids.extend(m.text_id for m in msgs)
            return []

    return register


def hits() -> float:
    return REGISTRY.get_sample_value("flockwatch_gateway_cache_total", {"result": "hit"}) or 0.0


async def test_a_repeated_text_is_answered_from_the_cache_without_going_on_the_bus(
    sms_bundle: Path, prefix: str
) -> None:
    sent: list[str] = []
    before = hits()
    cache: dict[str, Any] = {"gateway_cache_url": REDIS, "gateway_cache_prefix": prefix}
    async with stack(sms_bundle, extra=submitted_into(sent), **cache) as (client, _):
        first = (await client.post("/predict", json={"text": SPAM, "text_id": "c-1"})).json()
        await until(lambda: cached_keys(prefix), "the first decision cached")
        second = (await client.post("/predict", json={"text": SPAM, "text_id": "c-2"})).json()
        record = await client.get("/decisions/c-2")
        with_meta = {"text": SPAM, "text_id": "c-3", "metadata": {"k": "v"}}
        other_meta = (await client.post("/predict", json=with_meta)).json()
        accepted = await client.post("/texts", json={"text": SPAM, "text_id": "c-4"})
        at_once = await client.get("/decisions/c-4")  # answered from the cache: no waiting for the voters
        batch = (
            await client.post("/predict/batch", json={"texts": [{"text": SPAM, "text_id": "c-5"}, {"text": HAM}]})
        ).json()
        await asyncio.sleep(0.2)  # anything published would have reached the bus consumer by now
    assert first["cached"] is False and second["cached"] is True
    assert second["text_id"] == "c-2" and second["prediction"] == "spam"
    same = ("prediction", "confidence", "prediction_set", "voter_outputs", "path", "arbiter_version")
    assert {k: second[k] for k in same} == {k: first[k] for k in same}
    decision = Decision.model_validate(record.json())
    assert decision.message_id == "decision:c-2" and {v.text_id for v in decision.votes} == {"c-2"}
    assert other_meta["cached"] is False  # metadata can change the slice, so it is part of the key
    assert accepted.status_code == 202 and at_once.status_code == 200 and at_once.json()["text_id"] == "c-4"
    assert [d["cached"] for d in batch["decisions"]] == [True, False]
    assert sorted(sent) == sorted(["c-1", "c-3", batch["decisions"][1]["text_id"]])
    assert hits() - before == 3


def republished(bundle: Path, into: Path) -> Path:
    """A copy of `bundle` announced as a new version (same files, so every voter loads it)."""
    copy = shutil.copytree(bundle.resolve(), into)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] += "-republished"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


async def test_model_published_invalidates_the_cache(sms_bundle: Path, prefix: str, tmp_path: Path) -> None:
    sent: list[str] = []
    new = republished(sms_bundle, tmp_path / "v2")
    cache: dict[str, Any] = {"gateway_cache_url": REDIS, "gateway_cache_prefix": prefix}
    cache["model_roots"] = str(tmp_path)  # the new version lies outside the fixture bundle's models root
    async with stack(sms_bundle, extra=submitted_into(sent), **cache) as (client, bus):
        await client.post("/predict", json={"text": HAM, "text_id": "m-1"})
        await until(lambda: cached_keys(prefix), "the first decision cached")
        old = await cached_keys(prefix)
        assert (await client.post("/predict", json={"text": HAM, "text_id": "m-2"})).json()["cached"] is True
        version = read_manifest(new, verify=False).version
        await bus.publish(
            [
                ModelPublished(
                    message_id="model:test",
                    component="bundle",
                    version=version,
                    path=str(new),
                    manifest_sha256=manifest_sha256(new),
                )
            ]
        )
        await until(lambda: _none(prefix), "the old entries deleted")
        after = (await client.post("/predict", json={"text": HAM, "text_id": "m-3"})).json()
        await until(lambda: cached_keys(prefix), "the decision under the new version cached")
        again = (await client.post("/predict", json={"text": HAM, "text_id": "m-4"})).json()
        now = await cached_keys(prefix)
    assert after["cached"] is False and again["cached"] is True
    assert sent == ["m-1", "m-3"]
    assert len(old) == len(now) == 1 and old[0].rsplit(":", 1)[1] == now[0].rsplit(":", 1)[1]  # same text…
    assert old != now  # …under the new versions' digest


async def _none(prefix: str) -> bool:
    return not await cached_keys(prefix)


def _decision(text_id: str, components: dict[str, str], **changes: object) -> Decision:
    votes = [
        Vote(
            message_id=Vote.id_for(text_id, voter),
            text_id=text_id,
            voter=voter,
            model_version=components[component],
            probabilities={"ham": 0.9, "spam": 0.1},
            latency_ms=1.0,
        )
        for voter, component in (("regex", "regex"), ("tfidf_lr", "classical"))
    ]
    fields: dict[str, object] = {
        "message_id": Decision.id_for(text_id),
        "text_id": text_id,
        "prediction": "ham",
        "confidence": 0.9,
        "abstain": False,
        "prediction_set": ["ham"],
        "path": "consensus",
        "votes": votes,
        "arbiter_version": components["arbiter"],
        "thresholds": {"answer_at": 0.8},
        "latency_ms": 4.0,
    }
    return Decision.model_validate({**fields, **changes})


async def test_only_complete_decisions_of_the_models_in_force_are_kept(sms_bundle: Path, prefix: str) -> None:
    settings = GatewaySettings(
        _env_file=None, model_dir=sms_bundle, gateway_cache_url=REDIS, gateway_cache_prefix=prefix
    )
    components = read_manifest(sms_bundle, verify=False).components

    def text(text_id: str) -> TextSubmitted:
        return TextSubmitted(message_id=f"text:{text_id}", text_id=text_id, text=HAM)

    async with PredictionCache(settings) as cache:
        assert await cache.lookup([text("a")]) == []
        await cache.store([_decision("a", components, arbiter_version="arbiter-older")])  # a reload in progress
        assert await cache.lookup([text("b")]) == []
        await cache.store([_decision("b", components, missing_voters=["ws"])])  # a voter missed the deadline
        await cache.store([_decision("unasked", components)])  # not a text this gateway looked up
        assert await cache.lookup([text("c")]) == []
        await cache.store([_decision("c", components)])
        (hit,) = await cache.lookup([text("d")])
    assert hit.text_id == "d" and hit.message_id == "decision:d" and hit.prediction == "ham"
    assert [v.message_id for v in hit.votes] == ["vote:d:regex", "vote:d:tfidf_lr"]
    assert len(await cached_keys(prefix)) == 1


@pytest.mark.parametrize("url", [None, "redis://127.0.0.1:1/0"], ids=["no-redis", "redis-unreachable"])
async def test_without_a_reachable_redis_every_text_is_decided_by_the_voters(sms_bundle: Path, url: str | None) -> None:
    sent: list[str] = []
    async with stack(sms_bundle, extra=submitted_into(sent), gateway_cache_url=url) as (client, _):
        answers = [(await client.post("/predict", json={"text": SPAM, "text_id": f"n-{i}"})).json() for i in range(2)]
    assert [a["prediction"] for a in answers] == ["spam", "spam"]
    assert [a["cached"] for a in answers] == [False, False] and sorted(sent) == ["n-0", "n-1"]
