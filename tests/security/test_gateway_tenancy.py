"""Issue 19, text ids: each token's ids are its own, an id names one text (another text under it is a 409), and
a decision is read only by its submitter or an admin; with auth off (one tenant) ids work as before."""

from __future__ import annotations

from pathlib import Path

from tests.security.support import HAM, SPAM, fake_arbiter, fake_bundle, tenants
from tests.stack import stack


async def test_two_tenants_using_the_same_id_each_get_their_own_decision(tmp_path: Path) -> None:
    people = tenants(tmp_path)
    async with stack(
        fake_bundle(tmp_path / "bundle"), ["gateway"], extra=fake_arbiter(), auth_tokens_file=people.path
    ) as (client, _):
        alices = await client.post("/predict", json={"text": HAM, "text_id": "t1"}, headers=people.alice)
        bobs = await client.post("/predict", json={"text": SPAM, "text_id": "t1"}, headers=people.bob)
        batch = await client.post(
            "/predict/batch", json={"texts": [{"text": SPAM, "text_id": "t1"}]}, headers=people.bob
        )
        read_by_alice = await client.get("/decisions/t1", headers=people.alice)
        read_by_bob = await client.get("/decisions/t1", headers=people.bob)
    assert (alices.json()["text_id"], alices.json()["prediction"]) == ("t1", "ham")
    assert (bobs.json()["text_id"], bobs.json()["prediction"]) == ("t1", "spam")
    assert [d["prediction"] for d in batch.json()["decisions"]] == ["spam"]
    assert read_by_alice.json()["prediction"] == "ham" and read_by_bob.json()["prediction"] == "spam"
    assert read_by_bob.json()["text_id"] == f"{people.names['bob']}/t1"  # the id on the bus


async def test_reusing_an_id_for_another_text_is_a_409_and_the_same_text_an_idempotent_retry(tmp_path: Path) -> None:
    people = tenants(tmp_path)
    async with stack(
        fake_bundle(tmp_path / "bundle"), ["gateway"], extra=fake_arbiter(), auth_tokens_file=people.path
    ) as (client, _):
        first = await client.post("/predict", json={"text": HAM, "text_id": "t2"}, headers=people.alice)
        other_text = await client.post("/predict", json={"text": SPAM, "text_id": "t2"}, headers=people.alice)
        other_meta = await client.post(
            "/texts", json={"text": HAM, "text_id": "t2", "metadata": {"k": "v"}}, headers=people.alice
        )
        in_batch = await client.post(
            "/predict/batch",
            json={"texts": [{"text": HAM, "text_id": "new"}, {"text": SPAM, "text_id": "t2"}]},
            headers=people.alice,
        )
        retry = await client.post("/predict", json={"text": HAM, "text_id": "t2"}, headers=people.alice)
        retry_async = await client.post("/texts", json={"text": HAM, "text_id": "t2"}, headers=people.alice)
    assert first.status_code == 200
    for refused in (other_text, other_meta, in_batch):
        assert refused.status_code == 409
        assert "'t2' was already used for a different text or metadata" in refused.json()["detail"]
    assert in_batch.json()["detail"].startswith("texts[1]: ")
    assert retry.status_code == 200 and retry.json()["prediction"] == "ham"
    assert retry_async.status_code == 202


async def test_decisions_are_read_only_by_their_submitter_or_an_admin(tmp_path: Path) -> None:
    people = tenants(tmp_path)
    async with stack(
        fake_bundle(tmp_path / "bundle"), ["gateway"], extra=fake_arbiter(), auth_tokens_file=people.path
    ) as (client, _):
        await client.post("/predict", json={"text": HAM, "text_id": "private"}, headers=people.alice)
        own = await client.get("/decisions/private", headers=people.alice)
        guessed = await client.get("/decisions/private", headers=people.bob)
        asked = await client.get(f"/decisions/private?tenant={people.names['alice']}", headers=people.bob)
        admin = await client.get(f"/decisions/private?tenant={people.names['alice']}", headers=people.admin)
    assert own.status_code == 200
    assert guessed.status_code == 404
    assert asked.status_code == 403 and "reads only its own decisions" in asked.json()["detail"]
    assert admin.status_code == 200 and admin.json() == own.json()


async def test_with_auth_off_ids_are_plain_and_a_reused_one_is_still_refused(tmp_path: Path) -> None:
    async with stack(fake_bundle(tmp_path / "bundle"), ["gateway"], extra=fake_arbiter()) as (client, _):
        first = await client.post("/predict", json={"text": HAM, "text_id": "laptop-1"})
        record = await client.get("/decisions/laptop-1")
        reused = await client.post("/texts", json={"text": SPAM, "text_id": "laptop-1"})
    assert first.json()["text_id"] == "laptop-1" and record.json()["text_id"] == "laptop-1"
    assert reused.status_code == 409
