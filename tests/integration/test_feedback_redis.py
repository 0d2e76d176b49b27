"""The feedback service over Redis Streams into the real Postgres: batched, at least once, stored once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from flockwatch.common import topics
from flockwatch.common.bus import create_bus
from flockwatch.common.settings import CommonSettings

from tests.feedback_events import decision, feedback, text, vote
from tests.integration.feedback_support import count, eventually, fresh_schema, running_service

REDIS_URL = "redis://127.0.0.1:6379/13"  # a database of its own: these streams are deleted before and after


@pytest.fixture
async def clean_streams() -> AsyncIterator[None]:
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except OSError as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    await client.delete(*topics.ALL)
    yield
    await client.delete(*topics.ALL)
    await client.aclose()


async def test_events_through_redis_streams_are_stored_once_even_when_redelivered(clean_streams: None) -> None:
    async with fresh_schema() as schema, running_service(schema, bus_url=REDIS_URL) as service:
        producer = create_bus(
            CommonSettings(_env_file=None, bus_url=REDIS_URL, instance_id=f"p-{uuid.uuid4().hex[:6]}")
        )
        async with producer:
            n = 300
            texts = [text(f"t{i}", f"message {i}, mail me at user{i}@example.com") for i in range(n)]
            decisions = [
                decision(f"t{i}", "ham", [vote(f"t{i}", "regex", {"ham": 0.9, "spam": 0.1}, ("r",))]) for i in range(n)
            ]
            notes = [feedback(f"fb{i}", f"t{i}", f"rev{i % 3}", "spam" if i % 2 else "ham") for i in range(n)]
            await producer.publish([*texts, *decisions, *notes])
            await eventually(lambda: _stored(service, n), timeout=30)
            # a producer retrying after a lost ack publishes the same messages again
            await producer.publish(notes[:50])
            await producer.publish(texts[:20])
            await eventually(lambda: _drained(producer), timeout=30)
        assert await count(service, "feedback") == n
        assert await count(service, "texts") == n
        assert await service.store.pool.fetchval("SELECT count(*) FROM texts WHERE text LIKE '%@%'") == 0


async def _stored(service, n: int) -> bool:  # type: ignore[no-untyped-def]
    return all(
        [
            await count(service, "texts") == n,
            await count(service, "decisions") == n,
            await count(service, "feedback") == n,
        ]
    )


async def _drained(producer) -> bool:  # type: ignore[no-untyped-def]
    """The feedback group has read everything on the feedback stream and acknowledged it."""
    redis = producer.broker._connection  # noqa: SLF001 - the broker's own client
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups(topics.FEEDBACK_SUBMITTED)}
    group = groups.get("feedback")
    return bool(group) and group["pending"] == 0 and group.get("lag", 0) == 0
