"""Each service its own OS process on the real Redis: 200 texts, exactly one decision each, a voter killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from flockwatch.cli.demo import free_port
from flockwatch.common import topics
from flockwatch.common.bus import create_bus
from flockwatch.common.events import Decision, Event
from flockwatch.common.settings import CommonSettings

pytestmark = pytest.mark.connected
REDIS = "redis://127.0.0.1:6379/7"
FLOCKWATCH = str(Path(sys.executable).with_name("flockwatch"))


class Proc:
    """A service process started with `flockwatch serve NAME`."""

    def __init__(self, name: str, instance: str, env: dict[str, str], logs: Path, port: int | None = None) -> None:
        self.instance = instance
        self.log = logs / f"{instance}.log"
        args = [FLOCKWATCH, "serve", name, *(["--port", str(port)] if port else [])]
        with self.log.open("w") as out:  # a file, not a pipe: a full pipe would block the service
            self.popen = subprocess.Popen(
                args, env={**env, "FLOCKWATCH_INSTANCE_ID": instance}, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the worker prints `ready`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready" in self.log.read_text().splitlines():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.instance} exited with {self.popen.returncode}:\n{self.log.read_text()}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.instance} not ready:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no goodbye, no acks."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()


@pytest.fixture
def redis_env(sms_bundle: Path) -> Iterator[dict[str, str]]:
    """Environment of the service processes, on a flushed Redis database of their own."""
    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - Redis runs on every machine of this project
        pytest.fail(f"Redis at {REDIS} is required: {exc}")
    client.flushdb()
    yield {
        **os.environ,
        "FLOCKWATCH_BUS_URL": REDIS,
        "FLOCKWATCH_MODEL_DIR": str(sms_bundle),
        "FLOCKWATCH_ARBITER_DEADLINE_MS": "1500",
    }
    client.flushdb()


async def test_two_hundred_texts_get_one_decision_each_while_a_voter_dies(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    workers = [
        Proc(name, instance, redis_env, tmp_path)
        for name, instance in [
            ("regex_voter", "regex-1"),
            ("classical_voter", "classical-1"),
            ("classical_voter", "classical-2"),
            ("ws_voter", "ws-1"),
            ("arbiter", "arbiter-1"),
            ("arbiter", "arbiter-2"),
        ]
    ]
    gateway = Proc("gateway", "gateway-1", redis_env, tmp_path, port)
    decisions: list[Event] = []
    watcher = create_bus(CommonSettings(bus_url=REDIS, instance_id="test-watcher"))

    @watcher.subscribe(topics.DECISION_MADE, Decision, group="downstream-watcher")
    async def keep(msgs: list[Decision]) -> list[Event]:
        decisions.extend(msgs)
        return []

    try:
        for proc in workers:
            proc.wait_ready()
        async with watcher, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await _until_healthy(client)
            ids = [f"text-{i:03d}" for i in range(200)]
            texts = [f"message {i}: call me when you get home, or claim your prize now" for i in range(200)]
            for start in range(0, 200, 20):
                if start == 100:
                    workers[1].kill()  # a classical voter dies mid-run
                replies = await asyncio.gather(
                    *(
                        client.post("/texts", json={"text": t, "text_id": i})
                        for t, i in zip(texts[start : start + 20], ids[start : start + 20], strict=True)
                    )
                )
                assert {r.status_code for r in replies} == {202}
                await asyncio.sleep(0.05)
            for _ in range(300):
                if len({d.text_id for d in decisions}) >= 200:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(2)  # time for any duplicate to show up
            polled = await client.get(f"/decisions/{ids[-1]}")
    finally:
        for proc in [gateway, *workers]:
            proc.stop()
    counts = Counter(d.text_id for d in decisions)  # type: ignore[attr-defined]
    assert set(counts) == set(ids), f"missing decisions: {sorted(set(ids) - set(counts))[:5]}"
    assert max(counts.values()) == 1, f"duplicated: {[k for k, v in counts.items() if v > 1][:5]}"
    assert polled.status_code == 200
    by_arbiter = Counter(d.arbiter_instance for d in decisions)  # type: ignore[attr-defined]
    assert set(by_arbiter) == {"arbiter-1", "arbiter-2"}, by_arbiter  # both arbiters shared the load


async def _until_healthy(client: httpx.AsyncClient) -> None:
    for _ in range(300):
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("gateway did not come up")
