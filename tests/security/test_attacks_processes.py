"""Issue 19's attacks replayed against the real stack as a user runs it: gateway, regex, classical and ws voters
and the arbiter each their own OS process over Redis, auth on with two tenants, every bus message signed, the
bundle announcements signed. The in-process suites beside this one test each defence in detail; this one
checks that they hold between processes, with the real voters and arbiter deciding."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from flockwatch.arbiter.app import load_policy
from flockwatch.common import topics
from flockwatch.common.bus import create_bus
from flockwatch.common.events import TextSubmitted
from flockwatch.common.kafka_dev import free_port
from flockwatch.trainer import registry
from pydantic import SecretStr

from tests.processes import Proc, service_env, settings_of, until_healthy
from tests.security.support import HAM, SPAM, decision, tenants, until

pytestmark = pytest.mark.connected
REDIS = "redis://127.0.0.1:6379/2"
BUNDLE_KEY = "the services' bundle key"
SERVICES = [("regex_voter", "regex-1"), ("classical_voter", "classical-1"), ("ws_voter", "ws-1"), ("arbiter", "arb-1")]


@pytest.fixture
def flushed() -> Iterator[None]:
    client = redis.Redis.from_url(REDIS)
    client.flushdb()
    yield
    client.flushdb()


async def test_issue_19_attacks_on_services_as_processes_over_redis(
    sms_bundle: Path, tmp_path: Path, flushed: None
) -> None:
    people = tenants(tmp_path)
    root = tmp_path / "models" / "sms"  # the bundle under a models root of its own: `current` → v1
    shutil.copytree(sms_bundle.resolve(), root / "v1")
    registry.point_current(root, "v1")
    env = service_env(
        root / "current",
        FLOCKWATCH_BUS_URL=REDIS,
        FLOCKWATCH_AUTH_TOKENS_FILE=str(people.path),
        FLOCKWATCH_AUTH_REQUIRED="true",
        FLOCKWATCH_BUNDLE_KEY=BUNDLE_KEY,
        FLOCKWATCH_GATEWAY_CACHE_URL=REDIS,
    )
    policy = load_policy(sms_bundle)
    cheap = set(policy.expected_voters) - set(policy.cascade_voters)
    port = free_port()
    procs = [Proc(name, instance, env, tmp_path) for name, instance in SERVICES]
    gateway = Proc("gateway", "gateway-1", env, tmp_path, port)
    try:
        for proc in procs:
            proc.wait_ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            await until_healthy(client, gateway)
            alice, bob = people.alice, people.bob

            # cache poisoning: a benign text and then spam under one id; another tenant's spam is not the benign
            # text's cached decision (a 409 refuses the second text; the cache is per tenant)
            assert (await client.post("/texts", json={"text": HAM, "text_id": "x"}, headers=alice)).status_code == 202
            reused = await client.post("/texts", json={"text": SPAM, "text_id": "x"}, headers=alice)
            assert reused.status_code == 409
            bobs = await client.post("/predict", json={"text": SPAM}, headers=bob)
            assert bobs.status_code == 200 and bobs.json()["prediction_set"] != ["ham"], bobs.json()
            again = await client.post("/predict", json={"text": SPAM}, headers=bob)
            alices = await client.post("/predict", json={"text": SPAM}, headers=alice)
            assert again.json()["cached"] and not alices.json()["cached"]  # no cross-tenant oracle

            # ids are the tenant's own: bob cannot read alice's x, and his own x is his own text's decision
            assert (await client.get("/decisions/x", headers=bob)).status_code == 404
            own = await client.post("/predict", json={"text": SPAM, "text_id": "x"}, headers=bob)
            assert own.status_code == 200 and own.json()["prediction"] != "ham"
            assert (await client.get("/decisions/x", headers=alice)).json()["prediction"] == "ham"

            # no 500 from input; nobody anonymous
            for body in ('{"text": "bad \\ud800 text"}', '{"text": "bad \\u0000 text"}'):
                answer = await client.post(
                    "/predict", content=body, headers={**alice, "content-type": "application/json"}
                )
                assert answer.status_code == 422, answer.text
            assert (await client.post("/predict", json={"text": HAM})).status_code == 401

            # a 1,000-text batch on an idle stack: every decision carries every cheap voter's vote
            texts = [{"text": f"{i}: {SPAM if i % 3 else HAM}"} for i in range(1000)]
            batch = await client.post("/predict/batch", json={"texts": texts}, headers=alice)
            assert batch.status_code == 200, batch.text
            decisions = batch.json()["decisions"]
            assert len(decisions) == 1000 and not [d for d in decisions if d["path"] == "no_votes"]
            short = [d["text_id"] for d in decisions if d["missing_voters"] or not cheap <= set(d["voter_outputs"])]
            assert not short, f"{len(short)} decisions without every cheap voter's vote, e.g. {short[:3]}"

            # a forger on the broker without the bus key: a decision for an id alice will use, a text under
            # bob's id, and a bundle announcement (signed with another key, for a bundle outside the root)
            forger = create_bus(settings_of(env, instance_id="forger", bus_key="not the key"))
            evil = tmp_path / "elsewhere" / "evil"
            shutil.copytree(sms_bundle.resolve(), evil)
            forged = decision(f"{people.names['alice']}/later", "spam")
            async with forger:
                planted = TextSubmitted(message_id="forged-text", text_id=f"{people.names['bob']}/planted", text=SPAM)
                announced = registry.announcement(evil, SecretStr("not the key"))
                await forger.publish([forged, planted, announced])
            ids = [m.message_id.encode() for m in (forged, planted, announced)]
            store = redis.Redis.from_url(REDIS)

            def dead_lettered() -> bool:  # each forged message refused by the services reading its topic
                entries = b"".join(b"".join(f.values()) for _, f in store.xrange(topics.DEAD_LETTER))
                return all(i in entries for i in ids) and b"unsigned or wrongly signed" in entries

            await until(dead_lettered, "the forged messages dead-lettered", 20)
            later = await client.post("/predict", json={"text": HAM, "text_id": "later"}, headers=alice)
            assert later.status_code == 200 and later.json()["prediction"] == "ham"  # the real decision, not the forged
            assert (await client.get("/decisions/planted", headers=bob)).status_code == 404
            assert later.json()["arbiter_version"] == own.json()["arbiter_version"]  # no service switched bundles
    finally:
        for proc in [gateway, *procs]:
            proc.stop()
    logs = "".join(p.log.read_text() for p in [gateway, *procs])
    assert "Traceback" not in logs, logs[-3000:]
