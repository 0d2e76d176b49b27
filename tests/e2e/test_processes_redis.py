"""Each service its own OS process on the real Redis: 200 texts, exactly one decision each, a voter killed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.processes import assert_one_decision_each, run_texts, service_env

pytestmark = pytest.mark.connected
REDIS = "redis://127.0.0.1:6379/7"


@pytest.fixture
def redis_env(sms_bundle: Path) -> Iterator[dict[str, str]]:
    """Environment of the service processes, on a flushed Redis database of their own."""
    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - Redis runs on every machine of this project
        pytest.fail(f"Redis at {REDIS} is required: {exc}")
    client.flushdb()
    yield service_env(sms_bundle, FLOCKWATCH_BUS_URL=REDIS)
    client.flushdb()


async def test_two_hundred_texts_get_one_decision_each_while_a_voter_dies(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    run = await run_texts(redis_env, tmp_path, kill_at={100: ["classical-1"]})
    assert_one_decision_each(run, arbiters={"arbiter-1", "arbiter-2"})
