"""Fault tests' helpers: a redis-server of a test's own that can be killed, and a pipeline of service processes
whose members can be paused, killed and restarted while texts flow through them."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

import httpx
import redis
import redis.asyncio as aioredis
from flockwatch.common import topics
from flockwatch.common.bus import create_bus
from flockwatch.common.events import Decision, Event
from flockwatch.common.kafka_dev import free_port

from tests.processes import Proc, settings_of, until_healthy

REDIS_SERVER = "/usr/bin/redis-server"
# the work groups of the cheap path, and the streams they read (what must end with nothing pending)
WORK_GROUPS = [
    (topics.TEXT_SUBMITTED, "regex_voter"),
    (topics.TEXT_SUBMITTED, "classical_voter"),
    (topics.TEXT_SUBMITTED, "ws_voter"),
    (topics.TEXT_SUBMITTED, "arbiter"),
    (topics.VOTE_CAST, "arbiter"),
]


class RedisServer:
    """A redis-server on a free port with an append-only file synced on every write (`--appendfsync always`),
    so that a SIGKILL loses nothing acknowledged: consumer groups, pending entries and join state survive."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or start again, on the same port and files) and wait until it answers."""
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--logfile", "redis.log"]
        self.popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    client.close()
                    return
            except redis.exceptions.BusyLoadingError:
                pass  # replaying the append-only file
            except redis.ConnectionError:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}") from None
            time.sleep(0.02)
        raise TimeoutError("redis-server did not answer within 10 s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        assert self.popen is not None
        self.popen.kill()
        self.popen.wait()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)


class Pipeline:
    """Service processes (`flockwatch serve NAME`) and a gateway on `env`'s bus, a downstream watcher that keeps
    every decision, and an HTTP client on the gateway."""

    def __init__(self, env: dict[str, str], logs: Path, workers: list[tuple[str, str]]) -> None:
        self.env, self.logs, self.workers = env, logs, workers
        self.procs: dict[str, Proc] = {}
        self.decisions: list[Decision] = []
        self.port = free_port()
        self.watcher = create_bus(settings_of(env, instance_id="test-watcher"))
        self.watcher.subscribe(topics.DECISION_MADE, Decision, group="downstream-watcher")(self._keep)
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    async def _keep(self, msgs: list[Decision]) -> list[Event]:
        self.decisions.extend(msgs)
        return []

    async def __aenter__(self) -> Pipeline:
        for name, instance in self.workers:
            self.procs[instance] = Proc(name, instance, self.env, self.logs)
        self.procs["gateway-1"] = Proc("gateway", "gateway-1", self.env, self.logs, self.port)
        try:
            for instance, proc in self.procs.items():
                if instance != "gateway-1":
                    await asyncio.to_thread(proc.wait_ready)
            await self.watcher.start()
            await until_healthy(self.client, self.procs["gateway-1"], timeout=60)
        except BaseException:
            self._stop_processes()
            raise
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.client.aclose()
        await self.watcher.stop()
        self._stop_processes()

    def _stop_processes(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)  # a paused process would not handle SIGTERM
            proc.stop()

    async def submit(self, ids: list[str]) -> None:
        """POST /texts for each id concurrently; a 503 (bus unavailable) is retried as its Retry-After says."""

        async def one(text_id: str) -> None:
            body = {"text": f"{text_id}: call me when you get home, or claim your prize now", "text_id": text_id}
            for _ in range(30):
                reply = await self.client.post("/texts", json=body)
                if reply.status_code != 503:
                    assert reply.status_code == 202, reply.text
                    return
                await asyncio.sleep(float(reply.headers.get("retry-after", "1")))
            raise AssertionError(f"{text_id} refused 30 times: {reply.text}")

        await asyncio.gather(*(one(text_id) for text_id in ids))

    async def all_decided(self, ids: list[str], timeout: float) -> None:
        """Wait until every id has a decision downstream; fail naming those without one."""
        deadline = time.monotonic() + timeout
        while not set(ids) <= {d.text_id for d in self.decisions}:
            if time.monotonic() > deadline:
                missing = sorted(set(ids) - {d.text_id for d in self.decisions})
                raise AssertionError(f"{len(missing)} texts without a decision after {timeout} s: {missing[:10]}")
            await asyncio.sleep(0.05)

    def signal(self, instance: str, sig: signal.Signals) -> None:
        """Send a signal to a running process (SIGSTOP pauses it, SIGKILL kills it)."""
        self.procs[instance].popen.send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[instance].popen.wait()

    def restart(self, name: str, instance: str) -> Proc:
        """Start service `name` as `instance` (a new name, or the name of one that died); not waiting for it."""
        self.procs[instance] = Proc(name, instance, self.env, self.logs)
        return self.procs[instance]

    async def pending(self, stream: str, group: str, consumer: str | None = None) -> int:
        """Entries of `group` read but not acknowledged (by `consumer`, or by anyone)."""
        # a client of its own each time: a pooled connection may be stale after a broker restart
        async with aioredis.from_url(self.env["FLOCKWATCH_BUS_URL"]) as client:
            summary = await client.xpending(stream, group)
        if consumer is None:
            return int(summary["pending"])
        return sum(int(c["pending"]) for c in summary["consumers"] if c["name"].decode() == consumer)

    async def stall_holding_entries(self, instance: str, stream: str, group: str, chunks: list[list[str]]) -> int:
        """Pause `instance` (SIGSTOP), the only consumer of `group`, and submit a chunk of texts, until it holds
        some of them read but not acknowledged: a paused consumer's outstanding blocking read (the bus blocks
        1 s, `bus_faststream.REDIS_BLOCK_MS`) is still served by Redis. Returns how many it holds; it stays
        paused. A chunk it did not get (its read had timed out) is handled once it goes on; the chunks left over
        are submitted too (they wait in the stream).

        With a second consumer in the group Redis may hand the chunk to that one, and a paused process that goes
        on may find its read timed out and pause its reads for 5 s (FastStream): so, one consumer."""
        for i, chunk in enumerate(chunks):
            self.signal(instance, signal.SIGSTOP)
            await self.submit(chunk)
            for _ in range(40):
                held = await self.pending(stream, group, instance)
                if held:
                    await self.submit([text_id for rest in chunks[i + 1 :] for text_id in rest])
                    return held
                await asyncio.sleep(0.05)
            self.signal(instance, signal.SIGCONT)
            await asyncio.sleep(6)  # its reads may be paused for 5 s after a timed-out one
        raise AssertionError(f"{instance} never held an entry of {stream} for {group}")

    async def nothing_pending(self, groups: list[tuple[str, str]], timeout: float = 15) -> None:
        """Wait until no entry of these groups is left read but unacknowledged."""
        deadline = time.monotonic() + timeout
        while True:
            left = {f"{stream}/{group}": n for stream, group in groups if (n := await self.pending(stream, group))}
            if not left:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"entries still pending after {timeout} s: {left}")
            await asyncio.sleep(0.1)


def assert_one_complete_decision_each(decisions: list[Decision], ids: list[str]) -> None:
    """Exactly one decision per text id, each with every cheap voter's vote: nothing was lost on the way."""
    counts = Counter(d.text_id for d in decisions)
    assert set(counts) == set(ids), f"unexpected or missing: {sorted(set(counts) ^ set(ids))[:10]}"
    assert max(counts.values()) == 1, f"duplicated: {[k for k, v in counts.items() if v > 1][:10]}"
    incomplete = {
        d.text_id: (d.missing_voters, d.arbiter_instance, round(d.latency_ms))
        for d in decisions
        if d.missing_voters or d.path == "no_votes"
    }
    assert not incomplete, f"decided without (votes, by, after ms): {dict(list(incomplete.items())[:10])}"
