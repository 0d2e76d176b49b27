"""Real Apache Kafka and Postgres in containers (testcontainers): a bus round trip and `select 1`.

Skipped, with the reason, when no Docker engine answers (as on the development machines and CI here).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import docker
import pytest
from flockwatch.common import topics
from flockwatch.common.bus import create_bus
from flockwatch.common.bus_faststream import FastStreamBus
from flockwatch.common.events import Event, TextSubmitted, Vote
from flockwatch.common.kafka_config import create_topics
from flockwatch.common.settings import CommonSettings
from testcontainers.community.kafka import KafkaContainer
from testcontainers.community.postgres import PostgresContainer

try:
    docker.from_env(timeout=2).ping()
except (docker.errors.DockerException, OSError) as exc:  # OSError: requests' connection errors
    pytest.skip(f"no Docker engine running: {exc}", allow_module_level=True)

pytestmark = pytest.mark.docker
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"  # the image testcontainers' KafkaContainer drives (KRaft mode)
POSTGRES_IMAGE = "postgres:16-alpine"


@pytest.fixture(scope="module")
def kafka_bootstrap() -> Iterator[str]:
    with KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with PostgresContainer(POSTGRES_IMAGE, driver=None) as postgres:
        yield postgres.get_connection_url()


async def test_a_text_goes_round_through_kafka(kafka_bootstrap: str) -> None:
    await create_topics(kafka_bootstrap, [topics.TEXT_SUBMITTED, topics.VOTE_CAST])
    bus = create_bus(CommonSettings(bus_url=f"kafka://{kafka_bootstrap}", _env_file=None))
    assert isinstance(bus, FastStreamBus)
    run = uuid.uuid4().hex[:8]
    received: asyncio.Queue[Vote] = asyncio.Queue()

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=f"voter-{run}")
    async def vote(msgs: list[TextSubmitted]) -> list[Event]:
        return [
            Vote(
                message_id=Vote.id_for(m.text_id, "echo"),
                text_id=m.text_id,
                voter="echo",
                model_version="1",
                probabilities={"ham": 0.25, "spam": 0.75},
                latency_ms=0.0,
            )
            for m in msgs
        ]

    @bus.subscribe(topics.VOTE_CAST, Vote, group=f"sink-{run}")
    async def sink(msgs: list[Vote]) -> list[Event]:
        for msg in msgs:
            received.put_nowait(msg)
        return []

    text_id = f"kafka-{run}"
    async with bus:
        await bus.publish([TextSubmitted(message_id=f"text:{text_id}", text_id=text_id, text="win a prize now")])
        got = await asyncio.wait_for(received.get(), timeout=60)
    assert (got.text_id, got.voter, got.probabilities) == (text_id, "echo", {"ham": 0.25, "spam": 0.75})


async def test_postgres_answers_select_1(postgres_url: str) -> None:
    connection = await asyncpg.connect(postgres_url)
    try:
        assert await connection.fetchval("select 1") == 1
    finally:
        await connection.close()
