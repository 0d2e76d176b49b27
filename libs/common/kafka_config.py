"""Kafka in one place: partitions per topic, topic creation, and the consumer/producer settings of every service.

Tuned for low latency: fetches return as soon as data arrives, batches go out as soon as the handler returns
them, and a killed consumer's partitions move after its session (6 s). Two knobs are settings
(`kafka_session_timeout_ms`, `kafka_fetch_wait_ms`): the dev broker (`kafka_dev`) wants other values.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream import AckPolicy
from faststream.kafka.schemas import Topic
from flockwatch.common import topics
from flockwatch.common.bus import Route
from flockwatch.common.settings import CommonSettings

if TYPE_CHECKING:
    from faststream.security import BaseSecurity

# Every message is keyed by its text id, and every topic has the same partition count, so one text's
# texts, votes, requests and decision sit on the same partition number of each topic (Kafka's default
# partitioner: murmur2(key) mod partitions).
PARTITIONS: Final = 6
DEV_REPLICATION: Final = 1  # topics the services or the dev broker create; production provisions its own

# The broker holds a fetch until data arrives or `CommonSettings.kafka_fetch_wait_ms` passed. Apache Kafka
# answers as soon as data arrives, so the wait only sets the idle polling rate (100 ms: 10 fetches a second per
# consumer). Tansu answers a fetch over several partitions only when the wait is over, so on it the wait is
# each hop's added latency: the dev broker's environment sets 5 ms (which costs ~10 % of a core per idle
# consumer). Rare, not latency-critical topics poll slowly either way.
SLOW_TOPICS: Final = frozenset({topics.MODEL_PUBLISHED, topics.FEEDBACK_SUBMITTED, topics.DEAD_LETTER})
SLOW_FETCH_WAIT_MS: Final = 500

# Group membership. A consumer that dies without leaving (SIGKILL, lost host) keeps its partitions until its
# session times out: `CommonSettings.kafka_session_timeout_ms`, 6 s by default, the lowest session stock Kafka
# brokers accept (group.min.session.timeout.ms). Members learn of a rebalance at their next heartbeat; a
# rebalance waits for live members to rejoin at most a session (aiokafka's rebalance_timeout_ms default).
MAX_HEARTBEAT_INTERVAL_MS: Final = 1_000
MAX_POLL_INTERVAL_MS: Final = 300_000  # an LLM batch on CPU may take minutes; longer and the member is evicted

CONSUMER: Final[dict[str, Any]] = {
    "fetch_min_bytes": 1,
    "max_poll_interval_ms": MAX_POLL_INTERVAL_MS,
    # At least once: a batch's offsets are committed only after its outputs (votes, decisions, dead
    # letters) were published and acknowledged by the broker; when publishing fails, the consumer
    # rewinds to the batch and it is handled again (repeats are dropped downstream by message id).
    "ack_policy": AckPolicy.NACK_ON_ERROR,
}

PRODUCER: Final[dict[str, Any]] = {
    "acks": "all",  # a published vote or decision survives a leader change before offsets move on
    "linger_ms": 0,  # send at once; batching comes from the handlers' batches, published concurrently
    "request_timeout_ms": 10_000,
}


def topic(name: str) -> Topic:
    """A subscribed topic as FastStream declares it when missing: with the partition count the services expect."""
    return Topic(name, num_partitions=PARTITIONS, replication_factor=DEV_REPLICATION)


def consumer_options(route: Route[Any], group: str, settings: CommonSettings) -> dict[str, Any]:
    """FastStream batch-subscriber arguments for one route, consuming as `group`."""
    session_timeout_ms = settings.kafka_session_timeout_ms
    return {
        **CONSUMER,
        "group_id": group,
        "batch": True,
        "max_records": route.max_batch,
        "batch_timeout_ms": max(1, route.max_wait_ms),  # FastStream also sleeps this long after an empty poll
        "fetch_max_wait_ms": SLOW_FETCH_WAIT_MS if route.topic in SLOW_TOPICS else settings.kafka_fetch_wait_ms,
        # a work group's first member starts at the beginning, so nothing published before it is lost;
        # a broadcast (per-instance) group only wants what comes next
        "auto_offset_reset": "latest" if route.broadcast else "earliest",
        "session_timeout_ms": session_timeout_ms,
        "heartbeat_interval_ms": min(MAX_HEARTBEAT_INTERVAL_MS, session_timeout_ms // 3),
    }


def security(settings: CommonSettings) -> BaseSecurity | None:
    """FastStream's security object for the Kafka client of `settings` (SASL and/or TLS), or None: plaintext."""
    from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

    tls = ssl.create_default_context(cafile=settings.kafka_ca_file) if settings.kafka_tls else None
    if settings.kafka_sasl_mechanism is None:
        return BaseSecurity(ssl_context=tls, use_ssl=True) if tls else None
    assert settings.kafka_username is not None and settings.kafka_password is not None  # the settings check it
    kind = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
    return kind[settings.kafka_sasl_mechanism](
        settings.kafka_username, settings.kafka_password.get_secret_value(), ssl_context=tls, use_ssl=tls is not None
    )


async def create_topics(bootstrap: str | list[str], names: Iterable[str] = topics.ALL) -> None:
    """Create the topics that are missing, `PARTITIONS` partitions each (as compose's kafka-init does)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="flockwatch-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            await admin.create_topics([NewTopic(n, PARTITIONS, DEV_REPLICATION) for n in missing])
    finally:
        await admin.close()


__all__ = ["PARTITIONS", "consumer_options", "create_topics", "security", "topic"]
