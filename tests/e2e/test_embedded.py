"""HTTP in → bus → voters → arbiter → decision out, all in one process on the memory bus."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from flockwatch.common import topics
from flockwatch.common.bus import Bus
from flockwatch.common.events import DeadLetter, Decision, Event, TextSubmitted

from tests.stack import stack

SPAM = "WINNER!! You have won a £1000 cash prize. Call 09061701461 now to claim, T&C apply"


async def test_predict_returns_a_decision_with_every_voters_output(sms_bundle: Path) -> None:
    async with stack(sms_bundle) as (client, _):
        response = await client.post("/predict", json={"text": SPAM})
    assert response.status_code == 200
    body = response.json()
    assert body["prediction"] == "spam" and not body["abstain"]
    assert body["prediction_set"] == ["spam"]
    assert set(body["voter_outputs"]) == {"regex", "tfidf_lr", "tfidf_svm", "ws"}
    assert body["missing_voters"] == []
    assert body["latency_ms"] >= 0


async def test_texts_endpoint_accepts_then_decision_is_readable(sms_bundle: Path) -> None:
    async with stack(sms_bundle) as (client, _):
        accepted = await client.post("/texts", json={"text": "are we still on for lunch today?", "text_id": "t-1"})
        assert accepted.status_code == 202 and accepted.json()["text_id"] == "t-1"
        for _ in range(100):
            found = await client.get("/decisions/t-1")
            if found.status_code == 200:
                break
            await asyncio.sleep(0.02)
    decision = Decision.model_validate(found.json())
    assert decision.prediction == "ham"
    assert {v.voter for v in decision.votes} == {"regex", "tfidf_lr", "tfidf_svm", "ws"}
    assert decision.arbiter_version.startswith("arbiter-") and "answer_at" in decision.thresholds


def collector(topic: str, model: type[Event], into: list[Event]) -> Callable[[Bus], object]:
    """Register a downstream consumer that keeps what it reads."""

    def register(bus: Bus) -> None:
        @bus.subscribe(topic, model, group="downstream-test")
        async def keep(msgs: list[Event]) -> list[Event]:
            into.extend(msgs)
            return []

    return register


async def settle(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    """Wait until `condition()` holds (the bus is asynchronous)."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


async def test_downstream_consumers_read_decisions_from_the_topic(sms_bundle: Path) -> None:
    seen: list[Event] = []
    async with stack(sms_bundle, extra=collector(topics.DECISION_MADE, Decision, seen)) as (client, _):
        response = await client.post("/predict", json={"text": SPAM, "text_id": "down-1"})
        await settle(lambda: bool(seen))
    assert response.status_code == 200
    assert [d.text_id for d in seen] == ["down-1"]  # type: ignore[attr-defined]


async def test_unknown_decision_is_404(sms_bundle: Path) -> None:
    async with stack(sms_bundle) as (client, _):
        response = await client.get("/decisions/nope")
    assert response.status_code == 404 and "nope" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"text": ""}, 422, "empty"),
        ({"text": "   \n"}, 422, "empty"),
        ({"text": 42}, 422, "string"),
        ({}, 422, "required"),
        ({"text": "x" * 10_001}, 413, "limit"),
        ({"text": "ok", "surprise": 1}, 422, "not permitted"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(sms_bundle: Path, body: dict[str, object], status: int, words: str) -> None:
    async with stack(sms_bundle) as (client, _):
        response = await client.post("/predict", json=body)
    assert response.status_code == status
    assert words in response.json()["detail"]


async def test_oversized_body_is_413(sms_bundle: Path) -> None:
    async with stack(sms_bundle, gateway_max_body_bytes=1000) as (client, _):
        response = await client.post(
            "/predict", content=b'{"text": "' + b"a" * 5000 + b'"}', headers={"content-type": "application/json"}
        )
    assert response.status_code == 413 and "1000 bytes" in response.json()["detail"]


async def test_non_json_body_is_422(sms_bundle: Path) -> None:
    async with stack(sms_bundle) as (client, _):
        response = await client.post("/predict", content=b"not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


async def test_a_dead_voter_does_not_hang_the_arbiter(sms_bundle: Path) -> None:
    services = ["gateway", "regex_voter", "arbiter"]  # the classical and ws voters are down
    async with stack(sms_bundle, services, arbiter_deadline_ms=150) as (client, _):
        response = await client.post("/predict", json={"text": SPAM})
    body = response.json()
    assert response.status_code == 200
    assert body["missing_voters"] == ["tfidf_lr", "tfidf_svm", "ws"]
    assert set(body["voter_outputs"]) == {"regex"}
    assert body["latency_ms"] >= 150


async def test_no_voter_at_all_abstains_with_a_reason(sms_bundle: Path) -> None:
    async with stack(sms_bundle, ["gateway", "arbiter"], arbiter_deadline_ms=50) as (client, _):
        body = (await client.post("/predict", json={"text": SPAM})).json()
    assert body["abstain"] and body["path"] == "no_votes" and body["abstain_reason"]


async def test_admission_control_refuses_beyond_the_in_flight_limit(sms_bundle: Path) -> None:
    async with stack(sms_bundle, ["gateway", "arbiter"], arbiter_deadline_ms=500, gateway_max_in_flight=1) as (
        client,
        _,
    ):
        first = asyncio.create_task(client.post("/predict", json={"text": "one"}))
        await asyncio.sleep(0.1)
        second = await client.post("/predict", json={"text": "two"})
        assert (await first).status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "1"


async def test_redelivered_text_gets_exactly_one_decision(sms_bundle: Path) -> None:
    seen: list[Event] = []
    async with stack(sms_bundle, extra=collector(topics.DECISION_MADE, Decision, seen)) as (_, bus):
        msg = TextSubmitted(message_id="text:dup", text_id="dup", text="see you at 5")
        await bus.publish([msg])
        await settle(lambda: bool(seen))
        await bus.publish([msg])  # at-least-once delivery: the same message again
        await asyncio.sleep(0.3)
    assert [d.text_id for d in seen] == ["dup"]  # type: ignore[attr-defined]


async def test_poison_messages_go_to_dead_letter_and_consumers_keep_going(sms_bundle: Path) -> None:
    dead: list[Event] = []
    async with stack(sms_bundle, extra=collector(topics.DEAD_LETTER, DeadLetter, dead)) as (client, bus):
        await bus.publish_raw(topics.TEXT_SUBMITTED, b"{this is not json", "k")
        await bus.publish_raw(topics.TEXT_SUBMITTED, b'{"schema_version": 99}', "k")
        response = await client.post("/predict", json={"text": SPAM})
        await settle(lambda: len(dead) >= 12)
    assert response.status_code == 200 and response.json()["prediction"] == "spam", response.json()
    letters = [d for d in dead if isinstance(d, DeadLetter)]
    # each consumer group of the texts topic dead-letters each poison message once: the arbiter and every
    # voter, the embedding and LLM voters included (in "auto" mode they read the texts topic, ready for a
    # bundle that runs them on every text, though this bundle has nothing for them)
    consumers = ["arbiter", "classical_voter", "embedding_voter", "llm_voter", "regex_voter", "ws_voter"]
    assert sorted(d.consumer for d in letters) == sorted(consumers * 2)
    assert {d.payload for d in letters} == {"{this is not json", '{"schema_version": 99}'}
    assert all(d.topic == topics.TEXT_SUBMITTED and "invalid TextSubmitted" in d.error for d in letters)


async def test_a_voter_that_is_down_is_not_waited_for_once_it_has_been_silent(sms_bundle: Path) -> None:
    # only the regex voter runs; the bundle also expects the classical and ws voters
    async with stack(
        sms_bundle, ["gateway", "arbiter", "regex_voter"], arbiter_deadline_ms=1500, arbiter_voter_silence_ms=300
    ) as (client, _):
        first = (await client.post("/predict", json={"text": SPAM})).json()
        await asyncio.sleep(0.4)
        second = (await client.post("/predict", json={"text": "see you at 5"})).json()
    assert first["latency_ms"] >= 1500  # nobody was known to be down yet: the deadline decided
    assert second["latency_ms"] < 1000 and set(second["missing_voters"]) == {"tfidf_lr", "tfidf_svm", "ws"}


async def test_the_api_docs_load_their_assets_from_the_service_itself(sms_bundle: Path) -> None:
    async with stack(sms_bundle) as (client, _):
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            assets = [part.split('"')[0] for part in html.split('src="')[1:] + html.split('href="')[1:]]
            assert assets and not [a for a in assets if a.startswith("http")], assets  # no CDN
            for asset in assets:
                if asset.endswith((".js", ".css")):
                    assert (await client.get(asset)).status_code == 200, asset
