"""Bad messages and sick handlers on the in-process bus and on a real Redis (a redis-server of the test's own):
poison is dead-lettered with its error and counted while the consumer goes on; a handler whose backing service is
down gets its batch again instead of dead-lettering it; a voter that hangs or answers late is decided without."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from flockwatch.common import bus as bus_module
from flockwatch.common import topics
from flockwatch.common.bus import Bus, create_bus
from flockwatch.common.events import DeadLetter, Decision, Event, TextSubmitted, Vote
from flockwatch.common.settings import CommonSettings
from prometheus_client import REGISTRY

from tests.fault_support import RedisServer
from tests.integration.kafka_echo_worker import echo
from tests.integration.test_bus import until, voter_and_sinks
from tests.stack import stack

LIMIT = 65_536  # the smallest message size limit allowed: a huge payload needs only be larger than this


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "memory":
        yield "memory://"
        return
    redis_url = request.getfixturevalue("redis_url")
    import redis.asyncio as aioredis

    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()  # a new work group starts at the beginning of a stream: no other test's entries
    yield redis_url


def dead_letters_counted(group: str) -> float:
    return (
        REGISTRY.get_sample_value("flockwatch_dead_letters_total", {"topic": topics.TEXT_SUBMITTED, "group": group})
        or 0.0
    )


async def test_poison_is_dead_lettered_with_its_error_counted_and_the_consumer_goes_on(url: str) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    bus = create_bus(CommonSettings(_env_file=None, bus_url=url, instance_id=group, max_message_bytes=LIMIT))
    votes, dead, _ = voter_and_sinks(bus, group)
    good = [TextSubmitted(message_id=f"{group}-{i}", text_id=f"{group}-{i}", text="hi") for i in range(20)]
    future = good[0].model_dump(mode="json") | {"schema_version": 2, "message_id": f"{group}-v2"}
    huge = TextSubmitted(message_id=f"{group}-huge", text_id=f"{group}-huge", text="é\x00" * 100_000)
    huge_json = huge.model_dump_json().encode()  # valid, but over the limit: not even parsed
    before = dead_letters_counted(group)
    async with bus:
        await bus.publish(good[:10])
        await bus.publish_raw(topics.TEXT_SUBMITTED, json.dumps(future).encode(), "k")
        await bus.publish_raw(topics.TEXT_SUBMITTED, huge_json, "k")
        await bus.publish_raw(topics.TEXT_SUBMITTED, b'{"text_id": "no id", "text": [1, 2]}', "k")
        await bus.publish(good[10:])  # after the poison: still handled
        await until(lambda: len({v.text_id for v in votes}) >= 20 and len(dead) >= 3, seconds=20)
        await asyncio.sleep(0.2)
    assert sorted(v.text_id for v in votes) == sorted(m.text_id for m in good)
    invalid = {d.payload[:12]: d for d in dead if d.error.startswith("invalid TextSubmitted")}
    assert len(invalid) == 2, [d.error[:80] for d in dead]
    future_version, wrong_fields = invalid['{"schema_ver'], invalid['{"text_id": ']
    assert "schema_version\n  Input should be 1" in future_version.error
    assert "message_id\n  Field required" in wrong_fields.error and "text\n  Input should be a valid string" in (
        wrong_fields.error
    )
    [big] = [d for d in dead if d.error.startswith("message of")]
    assert big.error == f"message of {len(huge_json)} bytes exceeds the limit of {LIMIT}"
    assert big.truncated and big.payload_size == len(huge_json)
    assert len(big.model_dump_json().encode()) < LIMIT  # a dead letter is never too large itself
    assert {d.topic for d in dead} == {topics.TEXT_SUBMITTED} and {d.consumer for d in dead} == {group}
    assert dead_letters_counted(group) - before == 3


async def test_a_batch_failing_because_a_service_is_down_is_handled_again_not_dead_lettered(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler's backing store is down for its first two calls (ConnectionError): nothing is dead-lettered;
    the memory bus retries the batch, Redis redelivers it (claimed once idle for `redis_claim_idle_ms`)."""
    monkeypatch.setattr(bus_module, "TRANSIENT_PAUSE_S", 0.05)
    group = f"g{uuid.uuid4().hex[:8]}"
    settings = CommonSettings(_env_file=None, bus_url=url, instance_id=group, redis_claim_idle_ms=300)
    bus = create_bus(settings)
    calls: list[int] = []
    votes: list[Vote] = []
    dead: list[DeadLetter] = []

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=group)
    async def vote(msgs: list[TextSubmitted]) -> list[Event]:
        calls.append(len(msgs))
        if len(calls) <= 2:
            raise ConnectionError("the join store is restarting")
        return echo(msgs)

    keep_votes(bus, group, votes)
    keep_dead(bus, group, dead)
    msgs = [TextSubmitted(message_id=f"{group}-{i}", text_id=f"{group}-{i}", text="hi") for i in range(5)]
    async with bus:
        await bus.publish(msgs)
        await until(lambda: len({v.text_id for v in votes}) >= 5, seconds=15)
        await asyncio.sleep(0.3)
    assert sorted({v.text_id for v in votes}) == sorted(m.text_id for m in msgs)
    assert dead == [] and len(calls) >= 3


def keep_votes(bus: Bus, group: str, into: list[Vote]) -> None:
    @bus.subscribe(topics.VOTE_CAST, Vote, group=f"{group}-votes")
    async def keep(msgs: list[Vote]) -> list[Event]:
        into.extend(msgs)
        return []


def keep_dead(bus: Bus, group: str, into: list[DeadLetter]) -> None:
    @bus.subscribe(topics.DEAD_LETTER, DeadLetter, group=f"{group}-dead")
    async def keep(msgs: list[DeadLetter]) -> list[Event]:
        into.extend(msgs)
        return []


async def test_a_hanging_and_a_late_voter_do_not_hold_the_decision_back(sms_bundle: Path, redis_url: str) -> None:
    """Over Redis: `ws` hangs on every text and the TF-IDF votes come a second late; the arbiter decides each
    text at its deadline with the regex vote alone, and the late votes make no second decision."""
    import redis.asyncio as aioredis

    await aioredis.from_url(redis_url).flushdb()
    release = asyncio.Event()
    late: list[str] = []
    decisions: list[Decision] = []

    def sick_voters(bus: Bus) -> None:
        @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group="hanging_ws")
        async def hang(msgs: list[TextSubmitted]) -> list[Event]:
            await release.wait()  # a voter stuck in a call that never returns
            return []

        @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group="late_tfidf")
        async def answer_late(msgs: list[TextSubmitted]) -> list[Event]:
            await asyncio.sleep(1.0)
            late.extend(m.text_id for m in msgs)
            return [late_vote(m.text_id, voter) for m in msgs for voter in ("tfidf_lr", "tfidf_svm")]

        @bus.subscribe(topics.DECISION_MADE, Decision, group="test-decisions")
        async def keep(msgs: list[Decision]) -> list[Event]:
            decisions.extend(msgs)
            return []

    overrides = {"bus_url": redis_url, "arbiter_deadline_ms": 300, "instance_id": "sick"}
    async with stack(sms_bundle, ["gateway", "regex_voter", "arbiter"], sick_voters, **overrides) as (client, _):
        first, second = await asyncio.gather(
            client.post("/predict", json={"text": "WINNER! Claim your prize now", "text_id": "late-1"}),
            client.post("/predict", json={"text": "see you at 5", "text_id": "late-2"}),
        )
        await until(lambda: len(late) >= 2, seconds=10)
        await asyncio.sleep(0.5)  # the late votes reached the arbiter by now
        release.set()
    for reply in (first, second):
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert sorted(body["missing_voters"]) == ["tfidf_lr", "tfidf_svm", "ws"]
        assert set(body["voter_outputs"]) == {"regex"} and body["latency_ms"] >= 300
    assert sorted(d.text_id for d in decisions) == ["late-1", "late-2"]


def late_vote(text_id: str, voter: str) -> Vote:
    return Vote(
        message_id=Vote.id_for(text_id, voter),
        text_id=text_id,
        voter=voter,
        model_version="late",
        probabilities={"ham": 0.5, "spam": 0.5},
        latency_ms=1000.0,
    )


async def test_consumers_of_gone_instances_are_dropped_from_a_redis_group(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance restarting under a new name (the default: host and pid) leaves its old consumer behind; the next
    start drops consumers that hold nothing and were idle long enough, keeping one that still holds entries."""
    import redis.asyncio as aioredis
    from flockwatch.common import bus_faststream

    monkeypatch.setattr(bus_faststream, "FORGET_CONSUMER_IDLE_MS", 100)
    group = f"g{uuid.uuid4().hex[:8]}"
    async with aioredis.from_url(redis_url) as client:
        await client.flushdb()
        await client.xgroup_create(topics.TEXT_SUBMITTED, group, id="0", mkstream=True)
        await client.xadd(topics.TEXT_SUBMITTED, {b"__data__": b"{}"})
        await client.xreadgroup(group, "holding", {topics.TEXT_SUBMITTED: ">"}, count=1)  # holds its entry
        await client.xreadgroup(group, "gone", {topics.TEXT_SUBMITTED: ">"}, count=1)  # holds nothing
        await asyncio.sleep(0.2)
        settings = CommonSettings(_env_file=None, bus_url=redis_url, instance_id="new", redis_claim_idle_ms=0)
        bus = create_bus(settings)
        bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=group)(echo_async)
        async with bus:
            consumers = {c["name"].decode() for c in await client.xinfo_consumers(topics.TEXT_SUBMITTED, group)}
    assert "gone" not in consumers and "holding" in consumers


async def echo_async(msgs: list[TextSubmitted]) -> list[Event]:
    return echo(msgs)
