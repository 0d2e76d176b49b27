"""The feedback service on the real Postgres (a fresh schema per test) and the in-memory bus, over its HTTP API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from flockwatch.common import topics
from flockwatch.common.events import DeadLetter, Event
from flockwatch.feedback import migrate
from flockwatch.feedback.app import FeedbackService
from flockwatch.feedback.training import clean_training_rows, training_rows_sync

from tests.feedback_events import decision, feedback, text, vote
from tests.integration.feedback_support import DSN, api_client, count, eventually, fresh_schema, running_service

SPAM_P = {"ham": 0.1, "spam": 0.9}
HAM_P = {"ham": 0.9, "spam": 0.1}


@pytest.fixture
async def service() -> AsyncIterator[FeedbackService]:
    async with fresh_schema() as schema, running_service(schema) as svc:
        yield svc


@pytest.fixture
async def client(service: FeedbackService) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(service) as c:
        yield c


async def publish(service: FeedbackService, *events: Event) -> None:
    await service.bus.publish(list(events))


async def seed(service: FeedbackService) -> None:
    """Three texts: one the voters agree on, one they disagree on, one where the arbiter abstained."""
    await publish(
        service,
        text("calm", "see you at lunch"),
        text("split", "Hi Sam, you won a prize, call 07700 900123"),
        text("unsure", "free entry this week"),
    )
    await publish(
        service,
        decision("calm", "ham", [vote("calm", "regex", HAM_P, ("ham-greeting",)), vote("calm", "tfidf_lr", HAM_P)]),
        decision(
            "split",
            "spam",
            [vote("split", "regex", SPAM_P, ("spam-prize-claim",)), vote("split", "tfidf_lr", HAM_P)],
            prediction_set=["ham", "spam"],
            confidence=0.6,
            abstain=False,
        ),
        decision(
            "unsure",
            None,
            [vote("unsure", "tfidf_lr", {"ham": 0.45, "spam": 0.55})],
            confidence=0.55,
            prediction_set=["spam"],
        ),
    )
    await eventually(lambda: _both(service, 3))


async def _both(service: FeedbackService, n: int) -> bool:
    return await count(service, "texts") == n and await count(service, "decisions") == n


async def test_migrations_are_idempotent_and_reversible() -> None:
    async with fresh_schema() as schema:
        await migrate.upgrade_async(DSN, schema)
        await migrate.upgrade_async(DSN, schema)  # a second instance starting: nothing to do
        import asyncpg

        conn = await asyncpg.connect(DSN)
        try:
            tables = {
                r[0]
                for r in await conn.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
                )
            }
            assert {"texts", "decisions", "rule_fires", "feedback", "hygiene_runs", "alembic_version"} <= tables
            assert await conn.fetchval(f'SELECT version_num FROM "{schema}".alembic_version') == "0001"
            await asyncio.to_thread(migrate.downgrade, DSN, schema)
            left = await conn.fetchval(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'feedback'",
                schema,
            )
            assert left == 0
        finally:
            await conn.close()


async def test_texts_are_stored_scrubbed_with_decisions_and_rule_firings(service: FeedbackService) -> None:
    await seed(service)
    row = await service.store.pool.fetchrow("SELECT text, pii FROM texts WHERE text_id = 'split'")
    assert row["text"] == "Hi <NAME>, you won a prize, call <PHONE>"
    assert sorted(row["pii"]) == ["name", "phone"]
    fires = await service.store.pool.fetch("SELECT text_id, rule_id, rule_label FROM rule_fires ORDER BY text_id")
    assert [tuple(r) for r in fires] == [("calm", "ham-greeting", None), ("split", "spam-prize-claim", "spam")]
    voters = await service.store.pool.fetchval("SELECT voters FROM decisions WHERE text_id = 'split'")
    assert voters["regex"]["top"] == "spam" and voters["tfidf_lr"]["top"] == "ham"


async def test_post_feedback_is_idempotent_by_feedback_id(service: FeedbackService, client: httpx.AsyncClient) -> None:
    body = {"feedback_id": "fb-1", "text_id": "split", "label": "spam", "reviewer_id": "ann", "note": "mail a@b.co"}
    first = await client.post("/feedback", json=body)
    again = await client.post("/feedback", json=body)
    assert first.status_code == again.status_code == 202
    assert first.json() == {"feedback_id": "fb-1", "status": "stored", "duplicate": False}
    assert again.json()["duplicate"] is True
    assert await count(service, "feedback") == 1
    stored = (await client.get("/feedback/fb-1")).json()
    assert stored["note"] == "mail <EMAIL>" and stored["source"] == "http"
    # the announcement on the bus comes back to the consumer: still one row
    await publish(service, feedback("fb-1", "split", "ann", "spam"))
    await eventually(lambda: _seen_by_consumer(service))
    assert await count(service, "feedback") == 1


async def _seen_by_consumer(service: FeedbackService) -> bool:
    return "fb-1" in service.bus._seen.get("feedback", set())  # noqa: SLF001 - the bus's redelivery memory


async def test_reusing_a_feedback_id_for_other_feedback_is_a_conflict(client: httpx.AsyncClient) -> None:
    assert (
        await client.post("/feedback", json={"feedback_id": "x", "text_id": "t", "label": "spam", "reviewer_id": "ann"})
    ).status_code == 202
    reused = await client.post(
        "/feedback", json={"feedback_id": "x", "text_id": "t", "label": "ham", "reviewer_id": "ann"}
    )
    assert reused.status_code == 409 and "already used" in reused.json()["detail"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"text_id": "t", "label": "eggs", "reviewer_id": "ann"}, "not one of ['ham', 'spam']"),
        ({"text_id": "t", "reviewer_id": "ann"}, "needs a label or a thumbs"),
        ({"text_id": "t", "thumbs": "sideways", "reviewer_id": "ann"}, "thumbs"),
        ({"text_id": "", "label": "ham", "reviewer_id": "ann"}, "text_id"),
        ({"text_id": "t", "label": "ham"}, "reviewer_id"),
    ],
)
async def test_invalid_feedback_is_refused_with_422(
    client: httpx.AsyncClient, body: dict[str, str], problem: str
) -> None:
    response = await client.post("/feedback", json=body)
    assert response.status_code == 422
    assert problem in response.json()["detail"]


async def test_review_queue_ranks_by_disagreement_times_harm_and_drops_reviewed_texts(
    service: FeedbackService, client: httpx.AsyncClient
) -> None:
    await seed(service)
    queue = (await client.get("/review/queue")).json()
    assert [i["text_id"] for i in queue["items"]] == ["split", "unsure"] and queue["total"] == 2
    split, unsure = queue["items"]
    assert split["priority"] > unsure["priority"] and split["harm"] == 2.0
    assert any("voters disagree" in r for r in split["reasons"])
    assert any("arbiter abstained" in r for r in unsure["reasons"])
    assert split["text"].startswith("Hi <NAME>")
    await client.post("/feedback", json={"text_id": "split", "label": "spam", "reviewer_id": "ann"})
    assert [i["text_id"] for i in (await client.get("/review/queue")).json()["items"]] == ["unsure"]


async def test_the_review_queue_exports_as_jsonl(service: FeedbackService, tmp_path: Path) -> None:
    """`flockwatch feedback disagreements` (`make generate-disagreements`): the queue the review page shows."""
    import json

    from flockwatch.cli.main import app
    from typer.testing import CliRunner

    await seed(service)
    out = tmp_path / "review.jsonl"
    args = ["feedback", "disagreements", "--out", str(out), "--database-url", DSN]
    args += ["--schema", service.settings.feedback_db_schema]
    result = await asyncio.to_thread(CliRunner().invoke, app, args)
    assert result.exit_code == 0, result.output
    items = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {i["text_id"] for i in items} == {"split", "unsure"} and "2 of 2" in result.output
    assert all(i["reasons"] and i["priority"] > 0 for i in items)


async def test_conflicting_reviewers_are_reported_and_sent_back_to_review(
    service: FeedbackService, client: httpx.AsyncClient
) -> None:
    await seed(service)
    await client.post("/feedback", json={"text_id": "unsure", "label": "spam", "reviewer_id": "ann"})
    await client.post("/feedback", json={"text_id": "unsure", "label": "ham", "reviewer_id": "bob"})
    report = (await client.get("/feedback/conflicts")).json()
    assert report["unresolved"] == 1
    (conflict,) = report["conflicts"]
    assert conflict["text_ids"] == ["unsure"] and conflict["votes"] == {"spam": ["ann"], "ham": ["bob"]}
    queue = (await client.get("/review/queue", params={"reviewer": "cat"})).json()
    first = queue["items"][0]
    assert first["text_id"] == "unsure" and first["source"] == "feedback"
    assert "reviewers disagree" in first["reasons"][0]
    # the reviewers who already answered do not get it again
    assert "unsure" not in [
        i["text_id"] for i in (await client.get("/review/queue", params={"reviewer": "ann"})).json()["items"]
    ]
    await client.post("/feedback", json={"text_id": "unsure", "label": "spam", "reviewer_id": "cat"})
    report = (await client.get("/feedback/conflicts")).json()
    assert report["unresolved"] == 0 and report["conflicts"][0]["label"] == "spam"
    reviewers = {r["reviewer_id"]: r for r in (await client.get("/feedback/reviewers")).json()["reviewers"]}
    assert reviewers["ann"]["agreement"] == 0.5 and reviewers["bob"]["agreement"] == 0.0


async def test_duplicate_texts_are_merged_and_reported(service: FeedbackService, client: httpx.AsyncClient) -> None:
    await publish(service, text("d1", "Call me at 07700 900123"), text("d2", "call me at  +44 7700 900999"))
    await eventually(lambda: _texts(service, 2))
    await client.post("/feedback", json={"text_id": "d1", "label": "ham", "reviewer_id": "ann"})
    await client.post("/feedback", json={"text_id": "d2", "label": "spam", "reviewer_id": "bob"})
    await client.post(
        "/feedback", json={"feedback_id": "again", "text_id": "d2", "label": "spam", "reviewer_id": "bob"}
    )
    duplicates = (await client.get("/feedback/duplicates")).json()
    assert duplicates["duplicate_texts"][0]["text_ids"] == ["d1", "d2"]
    assert duplicates["repeated_feedback"][0]["n"] == 2
    conflict = (await client.get("/feedback/conflicts")).json()["conflicts"][0]
    assert conflict["text_ids"] == ["d1", "d2"] and conflict["status"] == "conflict"


async def _texts(service: FeedbackService, n: int) -> bool:
    return await count(service, "texts") == n


async def test_rule_stats_show_a_misfiring_rule_and_export_metrics(
    service: FeedbackService, client: httpx.AsyncClient
) -> None:
    texts, decisions = [], []
    for i in range(6):
        tid = f"r{i}"
        texts.append(text(tid, f"claim your prize {i}"))
        decisions.append(decision(tid, "spam", [vote(tid, "regex", SPAM_P, ("spam-prize-claim",))]))
    await publish(service, *texts, *decisions)
    await eventually(lambda: _both(service, 6))
    for i, label in enumerate(["spam", "ham", "ham", "ham"]):  # the rule was wrong three times of four
        await client.post("/feedback", json={"text_id": f"r{i}", "label": label, "reviewer_id": "ann"})
    rules = {r["rule_id"]: r for r in (await client.get("/rules/stats")).json()["rules"]}
    prize = rules["spam-prize-claim"]
    assert (prize["fires"], prize["labelled"], prize["correct"], prize["wrong"]) == (6, 4, 1, 3)
    assert prize["precision"] == 0.25 and prize["confusions"] == {"ham": 3}
    assert rules["spam-premium-number"]["fires"] == 0  # configured rules are listed even before they fire
    metrics = (await client.get("/metrics")).text
    assert 'flockwatch_rule_precision{rule="spam-prize-claim"} 0.25' in metrics
    assert 'flockwatch_rule_fires{rule="spam-prize-claim"} 6.0' in metrics
    assert "flockwatch_review_queue_size" in metrics
    assert "flockwatch_feedback_conflicts 0.0" in metrics


SPAM = ["WIN a free prize now call 09061701461", "URGENT you have won cash claim now", "free entry text WIN to 85069"]
HAM = ["are we still meeting for lunch today", "ok see you at home later", "can you pick up milk on the way"]


async def test_hygiene_flags_label_errors_back_to_review_and_out_of_training(
    service: FeedbackService, client: httpx.AsyncClient
) -> None:
    rows = [(f"s{i}-{j}", f"{t} {i}", "spam") for i in range(8) for j, t in enumerate(SPAM)]
    rows += [(f"h{i}-{j}", f"{t} {i}", "ham") for i in range(8) for j, t in enumerate(HAM)]
    rows[0] = (rows[0][0], rows[0][1], "ham")  # a planted label error
    await publish(service, *(text(tid, body) for tid, body, _ in rows))
    await eventually(lambda: _texts(service, len(rows)))
    await publish(service, *(feedback(f"fb-{tid}", tid, "ann", label) for tid, _, label in rows))
    await eventually(lambda: _feedback_rows(service, len(rows)))
    result = (await client.post("/feedback/hygiene")).json()
    assert result["flagged"] == 1 and result["issues"][0]["feedback_id"] == "fb-s0-0"
    assert (await client.get("/feedback/hygiene")).json()["last_run"]["n_flagged"] == 1
    queue = (await client.get("/review/queue")).json()["items"]
    assert queue[0]["text_id"] == "s0-0" and "likely label error" in queue[0]["reasons"][0]
    training = await clean_training_rows(service.store, ["ham", "spam"], hygiene=False)
    assert len(training.rows) == len(rows) - 1 and training.excluded == {"flagged": 1}
    assert ("WIN a free prize now call 09061701461 0", "ham") not in training.rows
    later = await clean_training_rows(service.store, ["ham", "spam"], since_seq=training.watermark, hygiene=False)
    assert later.rows == [] and later.watermark == training.watermark


async def _feedback_rows(service: FeedbackService, n: int) -> bool:
    return await count(service, "feedback") == n


async def test_thumbs_up_confirms_the_prediction_for_training(
    service: FeedbackService, client: httpx.AsyncClient
) -> None:
    await seed(service)
    await client.post("/feedback", json={"text_id": "calm", "thumbs": "up", "reviewer_id": "ann"})
    await client.post("/feedback", json={"text_id": "split", "thumbs": "down", "reviewer_id": "ann"})
    training = await clean_training_rows(service.store, ["ham", "spam"], hygiene=False)
    assert training.rows == [("see you at lunch", "ham")] and training.excluded == {"thumbs_down": 1}
    queue = (await client.get("/review/queue", params={"reviewer": "bob"})).json()["items"]
    assert queue[0]["text_id"] == "split" and "thumbs down" in queue[0]["reasons"][0]


async def test_bad_feedback_on_the_bus_is_dead_lettered_and_the_rest_stored(service: FeedbackService) -> None:
    dead: list[DeadLetter] = []
    service.bus.subscribe(topics.DEAD_LETTER, DeadLetter, group="test-dead")(_collect(dead))
    await service.bus.stop()
    await service.bus.start()
    await publish(
        service,
        feedback("ok-1", "t", "ann", "spam"),
        feedback("bad", "t", "ann", "eggs"),
        feedback("ok-2", "t", "bob", "ham"),
    )
    await eventually(lambda: _feedback_rows(service, 2))
    await eventually(lambda: _truthy(dead))
    assert "not one of" in dead[0].error and '"bad"' in dead[0].payload


def _collect(sink: list[DeadLetter]):  # type: ignore[no-untyped-def]
    async def handler(msgs: list[DeadLetter]) -> list[Event]:
        sink.extend(msgs)
        return []

    return handler


async def _truthy(items: list[DeadLetter]) -> bool:
    return bool(items)


async def test_feedback_goes_on_the_bus_when_postgres_is_down_and_is_stored_later(
    service: FeedbackService, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = service.store.insert_feedback
    outage = {"calls": 0}

    async def flaky(rows):  # type: ignore[no-untyped-def]
        outage["calls"] += 1
        if outage["calls"] <= 2:  # the HTTP attempt and the consumer's first try
            raise ConnectionRefusedError("postgres is restarting")
        return await real(rows)

    monkeypatch.setattr(service.store, "insert_feedback", flaky)
    response = await client.post(
        "/feedback", json={"feedback_id": "late", "text_id": "t", "label": "ham", "reviewer_id": "ann"}
    )
    assert response.status_code == 202 and response.json()["status"] == "queued"
    await eventually(lambda: _feedback_rows(service, 1))  # the consumer retried through the outage
    assert (await service.store.feedback("late"))["source"] == "bus"  # type: ignore[index]


def test_serve_builds_the_feedback_service_only_when_named() -> None:
    from flockwatch.cli.runtime import ALL, build
    from flockwatch.common.settings import CommonSettings

    assert "feedback" not in ALL  # the embedded default (demo, `flockwatch serve`) needs no Postgres
    _, services = build(["feedback"], CommonSettings(_env_file=None))
    assert [type(s).__name__ for s in services] == ["FeedbackService"]


async def test_enough_new_corrections_start_the_label_check_by_themselves() -> None:
    async with (
        fresh_schema() as schema,
        running_service(schema, feedback_hygiene_every=20, feedback_hygiene_min_rows=10) as service,
    ):
        rows = [(f"s{i}-{j}", f"{t} {i}", "spam") for i in range(4) for j, t in enumerate(SPAM)]
        rows += [(f"h{i}-{j}", f"{t} {i}", "ham") for i in range(4) for j, t in enumerate(HAM)]
        await publish(service, *(text(tid, body) for tid, body, _ in rows))
        await eventually(lambda: _texts(service, len(rows)))
        await publish(service, *(feedback(f"fb-{tid}", tid, "ann", label) for tid, _, label in rows))
        await eventually(lambda: _hygiene_ran(service), timeout=30)


async def _hygiene_ran(service: FeedbackService) -> bool:
    return await count(service, "hygiene_runs") >= 1


def test_training_rows_for_synchronous_callers_since_a_time() -> None:
    async def setup(schema: str) -> datetime:
        async with running_service(schema) as service:
            await publish(service, text("t1", "old news"), text("t2", "new claim"))
            await eventually(lambda: _texts(service, 2))
            await service.on_feedback([feedback("f1", "t1", "ann", "ham")])
            cut = await service.store.pool.fetchval("SELECT now()")
            await service.on_feedback([feedback("f2", "t2", "ann", "spam")])
            return cut  # type: ignore[no-any-return]

    async def run() -> None:
        async with fresh_schema() as schema:
            cut = await setup(schema)
            rows = await asyncio.to_thread(training_rows_sync, DSN, schema, since=cut, hygiene=False)
            assert rows.rows == [("new claim", "spam")]

    asyncio.run(run())


async def test_an_unreachable_database_fails_start_up_with_a_clear_error() -> None:
    from flockwatch.common.bus import create_bus
    from flockwatch.feedback.app import DatabaseUnavailable

    from tests.integration.feedback_support import settings_for

    settings = settings_for("fw_never", feedback_database_url="postgresql://postgres:secret@127.0.0.1:1/test")
    with pytest.raises(DatabaseUnavailable, match=r"PostgreSQL at 127\.0\.0\.1:1/test") as info:
        await FeedbackService(create_bus(settings), settings).start()
    assert "secret" not in str(info.value)
