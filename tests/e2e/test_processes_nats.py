"""Each service its own OS process on the real NATS JetStream: 200 texts, exactly one decision each, while a
voter, then an arbiter, is killed.

The two arbiters share one durable consumer per topic and keep their join state in Redis
(`FLOCKWATCH_STATE_URL`): a text and its votes may be pulled by different arbiters. What the killed arbiter
had pulled and not acknowledged is redelivered to the other after the consumer's ack wait.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.integration.test_bus import purge_nats
from tests.processes import assert_one_decision_each, run_texts, service_env

pytestmark = pytest.mark.connected
NATS = "nats://127.0.0.1:4222"
STATE = "redis://127.0.0.1:6379/15"


@pytest.fixture
async def nats_env(sms_bundle: Path) -> Iterator[dict[str, str]]:
    """Environment of the service processes: the JetStream stream purged, join state in a flushed Redis db."""
    await purge_nats(NATS)
    client = redis.Redis.from_url(STATE)
    client.flushdb()
    yield service_env(sms_bundle, FLOCKWATCH_BUS_URL=NATS, FLOCKWATCH_STATE_URL=STATE)
    client.flushdb()


async def test_two_hundred_texts_get_one_decision_each_while_a_voter_and_an_arbiter_die(
    nats_env: dict[str, str], tmp_path: Path
) -> None:
    run = await run_texts(nats_env, tmp_path, kill_at={60: ["classical-1"], 120: ["arbiter-1"]})
    assert_one_decision_each(run, arbiters={"arbiter-1", "arbiter-2"})
