"""Each service its own OS process on a real Kafka-protocol broker (Tansu): 200 texts, exactly one decision
each, while a voter, then an arbiter, is killed.

The two arbiters are one consumer group and keep their join state in Redis (`FLOCKWATCH_STATE_URL`), as in
docker-compose. They need it on Kafka too: a text's `TextSubmitted` and its votes sit on the same partition
number of their topics, but the arbiter's texts consumer and votes consumer are separate group members, so
partition p of each may be owned by different arbiters; and a vote's offset is committed once the vote is
stored, long before the text's deadline, so a killed arbiter's in-memory joins would be lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flockwatch.common.kafka_dev import TansuBroker

from tests.processes import assert_one_decision_each, run_texts, service_env

pytestmark = pytest.mark.connected
STATE = "redis://127.0.0.1:6379/14"


@pytest.fixture
def kafka_env(sms_bundle: Path, fresh_tansu: TansuBroker) -> Iterator[dict[str, str]]:
    """Environment of the service processes: a broker of this test's own, join state in a flushed Redis db."""
    client = redis.Redis.from_url(STATE)
    client.flushdb()
    yield service_env(sms_bundle, **fresh_tansu.env, FLOCKWATCH_STATE_URL=STATE)
    client.flushdb()


async def test_two_hundred_texts_get_one_decision_each_while_a_voter_and_an_arbiter_die(
    kafka_env: dict[str, str], tmp_path: Path
) -> None:
    # a classical voter dies, then an arbiter: its partitions of texts and votes move to the other arbiter
    # after the session timeout, which resumes from the last committed offsets
    run = await run_texts(kafka_env, tmp_path, kill_at={60: ["classical-1"], 120: ["arbiter-1"]})
    assert_one_decision_each(run, arbiters={"arbiter-1", "arbiter-2"})
