"""Feedback ingest: FeedbackSubmitted events through the bus (Redis Streams) into Postgres, events per minute.

Usage: python benchmarks/feedback_ingest.py --events 60000 --out benchmarks/results/feedback_ingest.json

Two measurements, each in a fresh Postgres schema (dropped afterwards) and on emptied streams:
- backlog: the events are on the stream first; the feedback service starts and drains them (its ingest rate);
- live: a producer in another process publishes while the service consumes (end to end, both on this box).
Every run checks that exactly the published events were stored (none lost, none twice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from flockwatch.common import topics
from flockwatch.common.bus import create_bus
from flockwatch.common.events import FeedbackSubmitted
from flockwatch.common.settings import CommonSettings
from flockwatch.feedback.app import FeedbackService
from flockwatch.feedback.settings import FeedbackSettings

ROOT = Path(__file__).resolve().parents[1]
REDIS = "redis://127.0.0.1:6379/15"  # a database no test uses: its flockwatch streams are emptied
DSN = "postgresql://postgres@127.0.0.1:5432/test"
TARGET_PER_MIN = 10_000


def events(n: int, run: str) -> list[FeedbackSubmitted]:
    """A realistic mix: 70 % corrections, 30 % thumbs; one in five with a note that holds an e-mail address."""
    out = []
    for i in range(n):
        label = ("spam" if i % 3 else "ham") if i % 10 < 7 else None
        out.append(
            FeedbackSubmitted(
                message_id=f"{run}-{i}",
                text_id=f"text-{i % (n // 2 or 1)}",
                label=label,
                thumbs=None if label else ("up" if i % 2 else "down"),
                note=f"checked with user{i}@example.com" if i % 5 == 0 else None,
                reviewer_id=f"reviewer-{i % 7}",
            )
        )
    return out


async def produce(bus_url: str, n: int, run: str, chunk: int = 1000) -> float:
    """Publish n events in pipelined chunks; returns the seconds it took."""
    bus = create_bus(CommonSettings(_env_file=None, bus_url=bus_url, instance_id=f"producer-{run}"))
    batch = events(n, run)
    async with bus:
        print("publishing", flush=True)  # the parent starts its clock here, not at process start-up
        start = time.perf_counter()
        for i in range(0, n, chunk):
            await bus.publish(batch[i : i + chunk])
    return time.perf_counter() - start


async def wait_stored(pool: asyncpg.Pool, schema: str, n: int, timeout: float) -> float:
    """Seconds until n feedback rows are in the schema (polling every 20 ms)."""
    start = time.perf_counter()
    while await pool.fetchval(f'SELECT count(*) FROM "{schema}".feedback') < n:
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"fewer than {n} rows after {timeout} s")
        await asyncio.sleep(0.02)
    return time.perf_counter() - start


async def measure(mode: str, bus_url: str, n: int, batch_max: int) -> dict[str, Any]:
    """One run: a fresh schema, emptied streams, the service, and the clock."""
    schema, run = f"fwbench_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex[:8]
    r = aioredis.from_url(bus_url)
    await r.delete(*topics.ALL)
    admin = await asyncpg.create_pool(DSN, min_size=1, max_size=2)
    settings = FeedbackSettings(
        _env_file=None,
        bus_url=bus_url,
        batch_max=batch_max,
        feedback_db_schema=schema,
        feedback_database_url=DSN,
        feedback_serve_http=False,
        feedback_hygiene_every=0,
        feedback_labels=ROOT / "configs" / "sms" / "labels.yaml",
        instance_id=f"bench-{run}",
    )
    service = FeedbackService(create_bus(settings), settings)
    result: dict[str, Any] = {"mode": mode, "events": n, "batch_max": batch_max}
    try:
        await service.start()  # migrations first: the clock measures ingest only
        if mode == "backlog":
            result["publish_seconds"] = round(await produce(bus_url, n, run), 3)
            async with service.bus:
                seconds = await wait_stored(admin, schema, n, timeout=300)
        else:
            async with service.bus:
                producer = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--produce",
                    str(n),
                    "--run",
                    run,
                    "--bus",
                    bus_url,
                    stdout=asyncio.subprocess.PIPE,
                )
                assert producer.stdout is not None
                await producer.stdout.readline()
                start = time.perf_counter()
                await wait_stored(admin, schema, n, timeout=300)
                seconds = time.perf_counter() - start
                await producer.wait()
        stored = await admin.fetchval(f'SELECT count(*) FROM "{schema}".feedback')
        expected = await admin.fetchval(
            f'SELECT count(*) FROM "{schema}".feedback WHERE feedback_id LIKE $1', f"{run}-%"
        )
        result.update(
            seconds=round(seconds, 3),
            events_per_min=round(n / seconds * 60),
            stored=stored,
            lost=n - expected,
            duplicated=stored - expected,
        )
    finally:
        await service.stop()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
        await r.delete(*topics.ALL)
        await r.aclose()
    return result


async def main(args: argparse.Namespace) -> None:
    logging.getLogger("faststream").setLevel(logging.WARNING)
    runs = [await measure(mode, args.bus, args.events, args.batch_max) for mode in ("backlog", "live")]
    for run in runs:
        print(
            f"{run['mode']:>7}: {run['events']} events in {run['seconds']} s = {run['events_per_min']:,} events/min "
            f"(lost {run['lost']}, duplicated {run['duplicated']})"
        )
    report = {
        "benchmark": "feedback ingest: FeedbackSubmitted over the bus into Postgres (batched unnest INSERT … ON "
        "CONFLICT DO NOTHING, notes PII-scrubbed)",
        "bus": args.bus.split("://")[0],
        "target_events_per_min": TARGET_PER_MIN,
        "runs": runs,
        "meets_target": all(r["events_per_min"] >= TARGET_PER_MIN and r["lost"] == 0 for r in runs),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--bus", default=REDIS, help="a Redis bus URL (its flockwatch streams are emptied)")
    parser.add_argument("--batch-max", type=int, default=256, help="FLOCKWATCH_BATCH_MAX for the consumer")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "feedback_ingest.json")
    parser.add_argument("--produce", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.produce:
        asyncio.run(produce(ns.bus, ns.produce, ns.run))
    else:
        asyncio.run(main(ns))
