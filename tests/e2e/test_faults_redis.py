"""Faults on the real Redis bus, each service its own OS process: consumers killed mid-batch and restarted, the
broker killed and restarted, a feedback service killed while it holds rows to store.

Each run uses a redis-server of its own (AOF synced on every write) and an arbiter deadline far beyond the run,
so that a text is decided only once every cheap voter's vote reached the arbiter: a vote lost anywhere leaves its
text undecided and fails the test, instead of hiding behind a deadline decision.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from flockwatch.common import topics
from flockwatch.common.bus import create_bus
from flockwatch.common.settings import CommonSettings

from tests.fault_support import WORK_GROUPS, Pipeline, RedisServer, assert_one_complete_decision_each
from tests.feedback_events import decision, feedback, text, vote
from tests.integration.feedback_support import DSN, ROOT, fresh_schema
from tests.processes import Proc

pytestmark = pytest.mark.connected


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def env(redis_server: RedisServer, sms_bundle: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLOCKWATCH_BUS_URL": redis_server.url,
        "FLOCKWATCH_MODEL_DIR": str(sms_bundle),
        "FLOCKWATCH_ARBITER_DEADLINE_MS": "120000",  # never within a run: only complete joins are decided
        "FLOCKWATCH_ARBITER_VOTER_SILENCE_MS": "600000",  # and a voter that is down is still waited for
        "FLOCKWATCH_ARBITER_LEASE_MS": "3000",  # a claim of a killed arbiter is taken over after 3 s
        "FLOCKWATCH_REDIS_CLAIM_IDLE_MS": "1000",  # entries a killed consumer held are claimed after 1 s
        "FLOCKWATCH_BUS_KEY": "signed messages must survive kills and claims too",
    }


def ids(start: int, stop: int) -> list[str]:
    return [f"text-{i:03d}" for i in range(start, stop)]


async def test_consumers_killed_mid_batch_and_a_broker_restart_lose_no_message(
    env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    """One run, three faults (one run: each costs the processes' start-up, ~15-40 s on 2 cores):
    1. the only regex voter dies holding texts it read; it comes back under a new name, and claims them;
    2. the arbiter dies holding texts (and votes) it read; it comes back under its old name, and claims them (a
       consumer reading new entries only, `>`, would never see them again: its reclaimer does);
    3. Redis is SIGKILLed while texts are submitted and restarted a second later: the gateway's publishes wait
       (retrying with backoff), every consumer reconnects.
    Every text gets exactly one decision, with every cheap voter's vote, and no entry is left pending."""
    workers = [
        ("regex_voter", "regex-1"),
        ("classical_voter", "classical-1"),
        ("ws_voter", "ws-1"),
        ("arbiter", "arbiter-1"),
    ]
    async with Pipeline(env, tmp_path, workers) as run:
        await run.submit(ids(0, 20))
        await run.all_decided(ids(0, 20), timeout=60)

        chunks = [ids(20, 30), ids(30, 40), ids(40, 50)]
        held_by_voter = await run.stall_holding_entries("regex-1", topics.TEXT_SUBMITTED, "regex_voter", chunks)
        run.signal("regex-1", signal.SIGKILL)
        await run.submit(ids(50, 60))  # no regex voter at all now: they wait in the stream
        regex_2 = run.restart("regex_voter", "regex-2")

        chunks = [ids(60, 70), ids(70, 80), ids(80, 90)]
        # the arbiter reads texts and votes alike: holding texts shows it held what it read when killed
        held_by_arbiter = await run.stall_holding_entries("arbiter-1", topics.TEXT_SUBMITTED, "arbiter", chunks)
        run.signal("arbiter-1", signal.SIGKILL)
        arbiter_1 = run.restart("arbiter", "arbiter-1")

        for proc in (regex_2, arbiter_1):  # a service starting while the broker is down exits
            await asyncio.to_thread(proc.wait_ready)
        await run.submit(ids(90, 110))  # in flight through the pipeline when the broker dies
        redis_server.kill()
        during = asyncio.create_task(run.submit(ids(110, 130)))  # waits in the gateway's publish retries
        await asyncio.sleep(1.0)
        assert not during.done()
        redis_server.start()
        await during
        await run.submit(ids(130, 150))

        await run.all_decided(ids(0, 150), timeout=90)
        await asyncio.sleep(1.5)  # time for a duplicate decision to show up
        await run.nothing_pending(WORK_GROUPS)
    assert held_by_voter and held_by_arbiter
    assert_one_complete_decision_each(run.decisions, ids(0, 150))


async def test_a_feedback_service_killed_holding_rows_stores_every_row_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The feedback service dies holding feedback it read but had not stored; restarted under the same name, it
    stores every text, decision and feedback row exactly once (some messages also come twice)."""
    async with fresh_schema() as schema:
        feedback_env = {
            **os.environ,
            "FLOCKWATCH_BUS_URL": redis_server.url,
            "FLOCKWATCH_FEEDBACK_DATABASE_URL": DSN,
            "FLOCKWATCH_FEEDBACK_DB_SCHEMA": schema,
            "FLOCKWATCH_FEEDBACK_SERVE_HTTP": "false",
            "FLOCKWATCH_FEEDBACK_LABELS": str(ROOT / "configs" / "sms" / "labels.yaml"),
            "FLOCKWATCH_FEEDBACK_RULES": str(ROOT / "configs" / "sms" / "rules.yaml"),
            "FLOCKWATCH_FEEDBACK_HYGIENE_EVERY": "0",
            "FLOCKWATCH_REDIS_CLAIM_IDLE_MS": "1000",
        }
        producer = create_bus(CommonSettings(_env_file=None, bus_url=redis_server.url, instance_id="producer"))
        n = 240
        texts = [text(f"t{i}", f"message {i}, mail me at user{i}@example.com") for i in range(n)]
        decisions = [decision(f"t{i}", "ham", [vote(f"t{i}", "regex", {"ham": 0.9, "spam": 0.1})]) for i in range(n)]
        notes = [feedback(f"fb{i}", f"t{i}", f"rev{i % 3}", "spam" if i % 2 else "ham") for i in range(n)]
        db = await asyncpg.connect(DSN, server_settings={"search_path": schema})
        service = Proc("feedback", "feedback-1", feedback_env, tmp_path)
        try:
            async with producer:
                await asyncio.to_thread(service.wait_ready)
                await producer.publish([*texts[:80], *decisions[:80], *notes[:80]])
                await _until_rows(db, 80)
                held = 0
                for start in (80, 120):  # pause; a chunk its open read takes is held, the next waits in the stream
                    service.popen.send_signal(signal.SIGSTOP)
                    await producer.publish(notes[start : start + 40])
                    held = held or await _held(producer, "feedback-1")
                    if not held:  # its read had timed out: let it go on (its reads may pause for 5 s after)
                        service.popen.send_signal(signal.SIGCONT)
                        await asyncio.sleep(6)
                service.kill()
                await producer.publish([*texts[80:], *decisions[80:], *notes[160:], *notes[:20]])
                service = Proc("feedback", "feedback-1", feedback_env, tmp_path)
                await _until_rows(db, n)
                await asyncio.sleep(1.0)  # a duplicate row would have been written by now
            counts = {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in ("texts", "decisions", "feedback")}
            distinct = await db.fetchval("SELECT count(DISTINCT feedback_id) FROM feedback")
        finally:
            service.popen.send_signal(signal.SIGCONT)
            service.stop()
            await db.close()
    assert held, "the feedback service never held an entry when killed"
    assert counts == {"texts": n, "decisions": n, "feedback": n} and distinct == n


async def _until_rows(db: asyncpg.Connection, n: int, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        counts = [await db.fetchval(f"SELECT count(*) FROM {t}") for t in ("texts", "decisions", "feedback")]
        if counts == [n, n, n]:
            return
        if loop.time() > deadline:
            raise AssertionError(f"texts, decisions, feedback rows after {timeout} s: {counts}, expected {n} each")
        await asyncio.sleep(0.1)


async def _held(producer: object, consumer: str) -> int:
    redis = producer.broker._connection  # type: ignore[attr-defined]  # noqa: SLF001 - the bus's own client
    for _ in range(40):
        summary = await redis.xpending(topics.FEEDBACK_SUBMITTED, "feedback")
        held = sum(int(c["pending"]) for c in summary["consumers"] if c["name"].decode() == consumer)
        if held:
            return held
        await asyncio.sleep(0.05)
    return 0
