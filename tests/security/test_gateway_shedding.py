"""Issue 19, one request must not shed everyone: a text id that will never be decided does not count as in
flight (so not as waiting, for the oldest-wait rule), and one token's texts in flight are capped (429)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.security.support import HAM, SPAM, fake_arbiter, fake_bundle, tenants
from tests.stack import stack


async def test_an_id_reused_for_another_text_does_not_shed_other_tenants(tmp_path: Path) -> None:
    people = tenants(tmp_path)
    async with stack(
        fake_bundle(tmp_path / "bundle"),
        ["gateway"],
        extra=fake_arbiter(),
        auth_tokens_file=people.path,
        gateway_shed_after_ms=200,
    ) as (client, _):
        decided = await client.post("/predict", json={"text": HAM, "text_id": "x"}, headers=people.alice)
        reused = await client.post("/texts", json={"text": SPAM, "text_id": "x"}, headers=people.alice)
        await asyncio.sleep(0.4)  # past the shedding threshold, had the reused id counted as waiting
        bystander = await client.post("/predict", json={"text": HAM}, headers=people.bob)
        health = await client.get("/health")
    assert decided.status_code == 200 and reused.status_code == 409
    assert bystander.status_code == 200, bystander.text
    assert health.json()["in_flight"] == 0


async def test_resubmitting_a_decided_text_is_not_put_in_flight_again(tmp_path: Path) -> None:
    decided: list[str] = []
    async with stack(
        fake_bundle(tmp_path / "bundle"), ["gateway"], extra=fake_arbiter(decided=decided), gateway_shed_after_ms=200
    ) as (client, _):
        first = await client.post("/predict", json={"text": HAM, "text_id": "again"})
        retried = [await client.post("/texts", json={"text": HAM, "text_id": "again"}) for _ in range(3)]
        await asyncio.sleep(0.4)
        bystander = await client.post("/predict", json={"text": SPAM})
        health = await client.get("/health")
    assert first.status_code == 200 and {r.status_code for r in retried} == {202}
    assert bystander.status_code == 200, bystander.text
    assert health.json()["in_flight"] == 0 and decided.count("again") == 1


async def test_one_token_cannot_hold_admission_for_everyone(tmp_path: Path) -> None:
    people = tenants(tmp_path)
    async with stack(
        fake_bundle(tmp_path / "bundle"),
        ["gateway"],
        extra=fake_arbiter(delay_s=1.0),
        auth_tokens_file=people.path,
        gateway_shed_after_ms=0,
        gateway_max_in_flight=10,
        gateway_max_in_flight_per_tenant=3,
    ) as (client, _):
        mine = [await client.post("/texts", json={"text": f"text {i}"}, headers=people.alice) for i in range(3)]
        over = await client.post("/texts", json={"text": "one more"}, headers=people.alice)
        batch = await client.post("/predict/batch", json={"texts": [{"text": "a"}]}, headers=people.alice)
        other = await client.post("/texts", json={"text": "bob's"}, headers=people.bob)
    assert {r.status_code for r in mine} == {202}
    assert over.status_code == 429 and over.headers["retry-after"] == "1"
    assert f"token {people.names['alice']!r} has 3 texts in flight (limit 3 per token)" in over.json()["detail"]
    assert batch.status_code == 429
    assert other.status_code == 202
