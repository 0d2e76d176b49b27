"""A small HTTP/1.1 load generator on raw asyncio streams (keep-alive connections, no client library on the
hot path) so that on a 2-core box the load it takes from the system under test stays small.

Closed loop: `clients` workers each send a request, wait for the answer, send the next.
Open loop: requests are *scheduled* at a fixed rate whatever the answers do; latency counts from the scheduled
time, so a slow server cannot hide its queueing by slowing the load (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=2**24)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        return status, headers, await self.reader.readexactly(int(headers.get("content-length", "0")))

    def close(self) -> None:
        self.writer.close()


@dataclass
class Outcome:
    """What came back: latencies of answered requests by status, and errors (no HTTP answer)."""

    latencies_ms: dict[int, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # 200 bodies (to check decisions)
    by_index: dict[int, int] = field(default_factory=dict)  # request number → status (0: no HTTP answer)

    def add(self, status: int, ms: float, index: int) -> None:
        self.latencies_ms.setdefault(status, []).append(ms)
        self.by_index[index] = status

    def indices(self, status: int) -> list[int]:
        return [i for i, s in self.by_index.items() if s == status]

    def count(self, status: int) -> int:
        return len(self.latencies_ms.get(status, []))

    def summary(self, status: int = 200) -> dict[str, float]:
        ms = np.array(self.latencies_ms.get(status, []) or [np.nan])
        return {
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2),
        }


async def closed_loop(
    host: str, port: int, path: str, make_body: Callable[[int], bytes], clients: int, seconds: float
) -> tuple[Outcome, float]:
    """`clients` workers posting back to back for `seconds`; returns the outcome and the elapsed time."""
    outcome = Outcome()
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        conn = await Connection.open(host, port)
        try:
            while time.perf_counter() < stop_at:
                start, i = time.perf_counter(), next(counter)
                status, _, body = await conn.post(path, make_body(i))
                outcome.add(status, (time.perf_counter() - start) * 1000, i)
                if status == 200:
                    outcome.bodies.append(body)
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return outcome, time.perf_counter() - start


async def open_loop(
    host: str, port: int, path: str, make_body: Callable[[int], bytes], rate: float, seconds: float, max_conns: int
) -> tuple[Outcome, dict[str, int]]:
    """Requests scheduled at `rate` per second for `seconds`, on up to `max_conns` connections; a request whose
    time comes while all connections are busy waits for one (its wait counts in its latency)."""
    outcome = Outcome()
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    opened = 0
    slots = asyncio.Semaphore(max_conns)
    total = int(rate * seconds)
    t0 = time.perf_counter() + 0.05

    async def one(i: int, due: float) -> None:
        nonlocal opened
        async with slots:
            if idle.empty():
                opened += 1
                conn = await Connection.open(host, port)
            else:
                conn = idle.get_nowait()
            try:
                status, _, body = await conn.post(path, make_body(i))
            except (OSError, asyncio.IncompleteReadError) as exc:
                outcome.errors.append(f"{type(exc).__name__}: {exc}")
                outcome.by_index[i] = 0
                conn.close()
                return
            outcome.add(status, (time.perf_counter() - due) * 1000, i)
            if status == 200:
                outcome.bodies.append(body)
            idle.put_nowait(conn)

    tasks = []
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0.001:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        idle.get_nowait().close()
    return outcome, {"connections_opened": opened, "scheduled": total}
