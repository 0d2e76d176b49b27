"""Kafka behaviour on a real Kafka-protocol broker (Tansu): keys and partitions, at-least-once, dead letters.

Every test uses consumer groups and text ids of its own on the session's broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaTimeoutError
from flockwatch.common import topics
from flockwatch.common.bus import Bus, create_bus
from flockwatch.common.events import (
    DeadLetter,
    Decision,
    Event,
    FeedbackSubmitted,
    TextSubmitted,
    Vote,
    VoteRequested,
)
from flockwatch.common.kafka_config import PARTITIONS
from flockwatch.common.kafka_dev import DEV_FETCH_WAIT_MS, DEV_SESSION_TIMEOUT_MS, TansuBroker
from flockwatch.common.settings import CommonSettings

from tests.integration.kafka_echo_worker import DIED, echo

ROOT = Path(__file__).resolve().parents[2]
E = TypeVar("E", bound=Event)


def kafka_bus(broker: TansuBroker, instance: str) -> Bus:
    settings = CommonSettings(
        bus_url=broker.url,
        instance_id=instance,
        batch_wait_ms=5,
        kafka_session_timeout_ms=DEV_SESSION_TIMEOUT_MS,
        kafka_fetch_wait_ms=DEV_FETCH_WAIT_MS,
        _env_file=None,
    )
    return create_bus(settings)


async def records(broker: TansuBroker, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on `topic` so far, read without a consumer group.

    Read until nothing more comes, not up to the end offsets: Tansu's ListOffsets answers with the
    number of record batches, not the next offset, when producers batch."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        out: list[ConsumerRecord[bytes, bytes]] = []
        while batches := await consumer.getmany(timeout_ms=300):
            for batch in batches.values():
                out += batch
        return out
    finally:
        await consumer.stop()


def ends(records_: list[ConsumerRecord[bytes, bytes]]) -> dict[int, int]:
    """The next offset of each partition that holds a record."""
    out: dict[int, int] = {}
    for record in records_:
        out[record.partition] = max(out.get(record.partition, 0), record.offset + 1)
    return out


async def committed(broker: TansuBroker, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of `topic` (partitions never committed are absent).

    Through a consumer of the group, not the admin client: Tansu answers the admin's "all partitions"
    OffsetFetch (topics = null) with a body aiokafka cannot decode."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = {p: await consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        await consumer.stop()
    return {p: offset for p, offset in offsets.items() if offset is not None}


async def all_committed(broker: TansuBroker, group: str, topic: str) -> bool:
    """The group has committed every record on `topic`."""
    return await committed(broker, group, topic) == ends(await records(broker, topic))


async def until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


def texts(run: str, n: int) -> list[TextSubmitted]:
    """`n` texts of this run, text ids `<run>-<i>`."""
    return [TextSubmitted(message_id=f"text:{run}-{i}", text_id=f"{run}-{i}", text="hi") for i in range(n)]


def collect(bus: Bus, topic: str, model: type[E], group: str) -> list[E]:
    """Subscribe `group` to `topic`; the (deduplicated) messages land in the returned list."""
    got: list[E] = []

    @bus.subscribe(topic, model, group=group)
    async def keep(msgs: list[E]) -> list[Event]:
        got.extend(msgs)
        return []

    return got


async def test_every_message_of_a_text_is_keyed_by_its_id_and_lands_on_one_partition(tansu: TansuBroker) -> None:
    run = uuid.uuid4().hex[:8]
    ids = [f"{run}-{i}" for i in range(48)]
    events: list[Event] = []
    for text_id in ids:
        events += [
            TextSubmitted(message_id=f"text:{text_id}", text_id=text_id, text="hi"),
            *(
                Vote(
                    message_id=Vote.id_for(text_id, v),
                    text_id=text_id,
                    voter=v,
                    model_version="1",
                    probabilities={"a": 1.0},
                    latency_ms=0.0,
                )
                for v in ("regex", "tfidf_lr")
            ),
            VoteRequested(
                message_id=VoteRequested.id_for(text_id),
                text_id=text_id,
                text="hi",
                voters=["llm"],
                reason="unsure",
                deadline_ms=100.0,
            ),
            Decision(
                message_id=Decision.id_for(text_id),
                text_id=text_id,
                confidence=0.5,
                abstain=True,
                abstain_reason="test",
                prediction_set=[],
                path="no_votes",
                votes=[],
                arbiter_version="1",
                thresholds={},
                latency_ms=0.0,
            ),
            FeedbackSubmitted(message_id=f"feedback:{text_id}", text_id=text_id, thumbs="up", reviewer_id="r"),
        ]
    async with kafka_bus(tansu, f"producer-{run}") as bus:
        await bus.publish(events)
    partitions: dict[str, set[int]] = {text_id: set() for text_id in ids}
    per_topic: Counter[str] = Counter()
    for topic in (
        topics.TEXT_SUBMITTED,
        topics.VOTE_CAST,
        topics.VOTE_REQUESTED,
        topics.DECISION_MADE,
        topics.FEEDBACK_SUBMITTED,
    ):
        for record in await records(tansu, topic):
            if record.key and record.key.decode().startswith(run):
                assert json.loads(record.value)["text_id"] == record.key.decode()  # the key is the text id
                partitions[record.key.decode()].add(record.partition)
                per_topic[topic] += 1
    assert set(per_topic.values()) == {48, 96} and len(per_topic) == 5  # everything arrived
    # one text, one partition number, on every topic: a text's texts, votes and decision are co-partitioned
    assert all(len(p) == 1 for p in partitions.values()), {k: v for k, v in partitions.items() if len(v) > 1}
    assert len(set().union(*partitions.values())) > 1  # and the texts spread over the partitions


async def test_the_offsets_move_only_once_the_outputs_are_published(tansu: TansuBroker) -> None:
    run = uuid.uuid4().hex[:8]
    bus = kafka_bus(tansu, f"flaky-{run}")
    handled: Counter[str] = Counter()

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=f"flaky-{run}")
    async def vote(msgs: list[TextSubmitted]) -> list[Event]:
        mine = [m for m in msgs if m.text_id.startswith(run)]
        handled.update(m.text_id for m in mine)
        return echo(mine)

    votes = collect(bus, topics.VOTE_CAST, Vote, f"sink-{run}")
    publish, failures = bus.publish_raw, [0]

    async def first_vote_publish_fails(topic: str, payload: bytes, key: str, headers: object = None) -> None:
        if topic == topics.VOTE_CAST and key.startswith(run) and not failures[0]:
            failures[0] += 1
            raise KafkaTimeoutError("the broker did not acknowledge in time")
        await publish(topic, payload, key, headers)  # type: ignore[arg-type]

    bus.publish_raw = first_vote_publish_fails
    sent = texts(run, 30)
    async with bus:
        await bus.publish(sent)
        await until(lambda: len({v.text_id for v in votes if v.text_id.startswith(run)}) >= 30)
        await asyncio.sleep(0.3)
    mine = [v.text_id for v in votes if v.text_id.startswith(run)]
    assert failures == [1]
    assert sorted(mine) == sorted(t.text_id for t in sent)  # nothing lost, each vote once downstream
    assert max(handled.values()) == 2  # the batch whose publish failed was not committed: it came back
    assert await all_committed(tansu, f"flaky-{run}", topics.TEXT_SUBMITTED)  # and in the end all is committed


def start_worker(broker: TansuBroker, group: str, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.integration.kafka_echo_worker", broker.url, group, *flags],
            cwd=ROOT,
            env={**os.environ, **broker.env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_a_worker_dying_between_publishing_and_committing_is_redelivered_and_the_repeats_dropped(
    tansu: TansuBroker, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    group = f"echo-{run}"
    sink = kafka_bus(tansu, f"sink-{run}")
    votes = collect(sink, topics.VOTE_CAST, Vote, f"sink-{run}")
    async with sink:
        await sink.publish(texts(run, 40))
        first = start_worker(tansu, group, tmp_path / "first.log", "--die-after-publishing", run)
        assert await asyncio.to_thread(first.wait, 60) == DIED, (tmp_path / "first.log").read_text()
        assert await committed(tansu, group, topics.TEXT_SUBMITTED) == {}  # it died before committing
        on_the_wire = Counter(
            json.loads(r.value)["message_id"]
            for r in await records(tansu, topics.VOTE_CAST)
            if r.key.startswith(run.encode())
        )
        assert on_the_wire  # ... but after publishing
        second = start_worker(tansu, group, tmp_path / "second.log")
        try:
            for _ in range(300):  # until the second worker has committed everything
                if await all_committed(tansu, group, topics.TEXT_SUBMITTED):
                    break
                await asyncio.sleep(0.2)
        finally:
            second.terminate()
            await asyncio.to_thread(second.wait, 10)
    repeated = Counter(
        json.loads(r.value)["message_id"]
        for r in await records(tansu, topics.VOTE_CAST)
        if r.key.startswith(run.encode())
    )
    assert len(repeated) == 40
    assert set(on_the_wire) <= {k for k, n in repeated.items() if n == 2}  # the uncommitted batch came again
    mine = [v.message_id for v in votes if v.message_id.startswith(f"vote:{run}")]
    assert sorted(mine) == sorted(repeated)  # downstream saw each vote once: repeats dropped by id


async def test_a_poison_message_goes_to_the_dead_letter_topic_and_its_partition_keeps_moving(
    tansu: TansuBroker,
) -> None:
    run = uuid.uuid4().hex[:8]
    bus = kafka_bus(tansu, f"poison-{run}")
    handled: list[str] = []

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=f"voter-{run}")
    async def vote(msgs: list[TextSubmitted]) -> list[Event]:
        mine = [m for m in msgs if m.text_id.startswith(run)]
        if any(m.text == "explode" for m in mine):
            raise RuntimeError("this text breaks the handler")
        handled.extend(m.message_id for m in mine)
        return []

    dead = collect(bus, topics.DEAD_LETTER, DeadLetter, f"dead-{run}")

    def poison_of_this_run() -> list[DeadLetter]:  # not earlier tests' poison, which the group also reads
        return [d for d in dead if d.consumer == f"voter-{run}" and run in d.payload]

    key = f"{run}-same-key"  # everything on one partition, the poison in the middle
    bad = TextSubmitted(message_id=f"text:{run}-bad", text_id=key, text="explode")
    async with bus:
        good = [TextSubmitted(message_id=f"text:{run}-{i}", text_id=key, text=f"ok {i}") for i in range(3)]
        await bus.publish(good[:1])
        await bus.publish_raw(topics.TEXT_SUBMITTED, f'{{"not json": "{run}"'.encode(), key)
        await bus.publish([bad])
        await bus.publish(good[1:])
        await until(lambda: len(handled) >= 3 and len(poison_of_this_run()) >= 2)
        await asyncio.sleep(0.3)
    mine = poison_of_this_run()
    assert sorted(d.error.split(":")[0] for d in mine) == ["RuntimeError", "invalid TextSubmitted"]
    assert handled == [m.message_id for m in good]  # the texts after the poison were handled, in order
    partition = next(r.partition for r in await records(tansu, topics.TEXT_SUBMITTED) if r.key == key.encode())
    end = ends(await records(tansu, topics.TEXT_SUBMITTED))[partition]
    assert (await committed(tansu, f"voter-{run}", topics.TEXT_SUBMITTED))[partition] == end
