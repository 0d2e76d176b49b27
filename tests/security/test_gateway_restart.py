"""Issue 19: decisions retrievable after a gateway restart (kept in Redis by their bus id), and still only by
their submitter."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.security.support import REDIS, SPAM, fake_arbiter, fake_bundle, tenants
from tests.stack import stack


async def test_a_decision_is_readable_after_the_gateway_restarts_by_its_submitter_only(tmp_path: Path) -> None:
    people = tenants(tmp_path)
    bundle = fake_bundle(tmp_path / "bundle")
    settings = {
        "gateway_cache": False,  # the archive alone
        "gateway_archive_url": REDIS,
        "gateway_archive_ttl_s": 60,
        "gateway_cache_prefix": f"fwtest:restart:{uuid.uuid4().hex[:8]}:cache",
        "auth_tokens_file": people.path,
    }
    async with stack(bundle, ["gateway"], extra=fake_arbiter(0.0), **settings) as (client, _):
        answered = await client.post("/predict", json={"text": SPAM, "text_id": "mine"}, headers=people.alice)
    assert answered.status_code == 200
    async with stack(bundle, ["gateway"], **settings) as (client, _):  # a new gateway: nothing in memory
        again = await client.get("/decisions/mine", headers=people.alice)
        other = await client.get("/decisions/mine", headers=people.bob)
        unknown = await client.get("/decisions/never-sent", headers=people.alice)
    assert again.status_code == 200, again.text
    assert again.json()["text_id"] == f"{people.names['alice']}/mine"
    assert again.json()["prediction"] == answered.json()["prediction"]
    assert other.status_code == 404 and unknown.status_code == 404
