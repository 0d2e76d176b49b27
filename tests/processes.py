"""Services as OS processes (`flockwatch serve NAME`), and a run of texts through them while some are killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from flockwatch.common import topics
from flockwatch.common.bus import create_bus
from flockwatch.common.events import Decision, Event
from flockwatch.common.kafka_dev import free_port
from flockwatch.common.settings import CommonSettings
from prometheus_client.parser import text_string_to_metric_families

FLOCKWATCH = str(Path(sys.executable).with_name("flockwatch"))
# (service, instance): two classical voters and two arbiters, so that each kind can lose one
WORKERS = [
    ("regex_voter", "regex-1"),
    ("classical_voter", "classical-1"),
    ("classical_voter", "classical-2"),
    ("ws_voter", "ws-1"),
    ("arbiter", "arbiter-1"),
    ("arbiter", "arbiter-2"),
]


class Proc:
    """A process started with `flockwatch serve NAME …` (one service, or several named together).

    `session`: in a session of its own, so that `kill` takes its children (a training job) with it, as a
    container's kill would."""

    def __init__(
        self,
        name: str | list[str],
        instance: str,
        env: dict[str, str],
        logs: Path,
        port: int | None = None,
        session: bool = False,
    ) -> None:
        self.instance = instance
        self.session = session
        self.log = logs / f"{instance}.log"
        self.metrics_port = free_port()  # bus-only services serve Prometheus metrics here (FLOCKWATCH_METRICS_PORT)
        names = [name] if isinstance(name, str) else name
        args = [FLOCKWATCH, "serve", *names, *(["--port", str(port)] if port else [])]
        own = {"FLOCKWATCH_INSTANCE_ID": instance, "FLOCKWATCH_METRICS_PORT": str(self.metrics_port)}
        with self.log.open("w") as out:  # a file, not a pipe: a full pipe would block the service
            self.popen = subprocess.Popen(
                args, env={**env, **own}, stdout=out, stderr=subprocess.STDOUT, start_new_session=session
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
        """SIGKILL (to its whole session, if it has one): no goodbye, no acks, no leaving the consumer group."""
        if self.session:
            os.killpg(self.popen.pid, signal.SIGKILL)
        else:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def settings_of(env: dict[str, str], **overrides: str) -> CommonSettings:
    """The common settings a process with environment `env` reads."""
    names = {f"FLOCKWATCH_{name.upper()}": name for name in CommonSettings.model_fields}
    given = {names[key]: value for key, value in env.items() if key in names}
    return CommonSettings(**{**given, **overrides})


@dataclass
class Run:
    """What came out of a run: every decision the downstream watcher saw, and the gateway's answer for the last."""

    ids: list[str]
    decisions: list[Decision]
    last_polled: int
    texts_read: dict[str, float] = field(default_factory=dict)  # per worker: texts it consumed (its metrics)


def service_env(bundle: Path, **bus: str) -> dict[str, str]:
    """Environment of the service processes of the process suites: the bundle, a 1.5 s arbiter deadline, no
    load shedding (services are killed mid-run, so decisions come late by design; tests/e2e/test_admission.py
    tests shedding), every bus message signed and checked, plus the transport's own variables in `bus`."""
    return {
        **os.environ,
        **bus,
        "FLOCKWATCH_MODEL_DIR": str(bundle),
        "FLOCKWATCH_ARBITER_DEADLINE_MS": "1500",
        "FLOCKWATCH_GATEWAY_SHED_AFTER_MS": "0",
        "FLOCKWATCH_BUS_KEY": "every message signed, every one checked",  # tests/security/test_bus_signing.py
    }


async def run_texts(env: dict[str, str], logs: Path, kill_at: dict[int, list[str]], n: int = 200) -> Run:
    """Start WORKERS and a gateway on `env`'s bus, submit `n` texts in bursts of 20 and SIGKILL the named
    instances before the burst starting at each `kill_at` index; collect the decisions."""
    port = free_port()
    workers = {instance: Proc(name, instance, env, logs) for name, instance in WORKERS}
    gateway = Proc("gateway", "gateway-1", env, logs, port)
    decisions: list[Decision] = []
    watcher = create_bus(settings_of(env, instance_id="test-watcher"))

    @watcher.subscribe(topics.DECISION_MADE, Decision, group="downstream-watcher")
    async def keep(msgs: list[Decision]) -> list[Event]:
        decisions.extend(msgs)
        return []

    ids = [f"text-{i:03d}" for i in range(n)]
    texts_read: dict[str, float] = {}
    try:
        for proc in workers.values():
            proc.wait_ready()
        async with watcher, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            await until_healthy(client)
            texts = [f"message {i}: call me when you get home, or claim your prize now" for i in range(n)]
            for start in range(0, n, 20):
                if kill_at.get(start):  # what each worker had read, before some of them die
                    texts_read |= await _texts_read(client, [w for w in workers.values() if w.popen.poll() is None])
                for instance in kill_at.get(start, []):
                    workers[instance].kill()
                replies = await asyncio.gather(
                    *(
                        client.post("/texts", json={"text": t, "text_id": i})
                        for t, i in zip(texts[start : start + 20], ids[start : start + 20], strict=True)
                    )
                )
                assert {r.status_code for r in replies} == {202}
                await asyncio.sleep(0.05)
            for _ in range(600):
                if len({d.text_id for d in decisions}) >= n:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(2)  # time for any duplicate to show up
            polled = await client.get(f"/decisions/{ids[-1]}")
            texts_read |= await _texts_read(client, [w for w in workers.values() if w.popen.poll() is None])
    finally:
        for proc in [gateway, *workers.values()]:
            proc.stop()
    return Run(ids, decisions, polled.status_code, texts_read)


def assert_one_decision_each(run: Run, arbiters: set[str]) -> None:
    """Every text got exactly one decision, the gateway knows the last one, and `arbiters` all decided some."""
    counts = Counter(d.text_id for d in run.decisions)
    assert set(counts) == set(run.ids), f"missing decisions: {sorted(set(run.ids) - set(counts))[:5]}"
    assert max(counts.values()) == 1, f"duplicated: {[k for k, v in counts.items() if v > 1][:5]}"
    assert run.last_polled == 200
    by_arbiter = Counter(d.arbiter_instance for d in run.decisions)
    assert set(by_arbiter) == arbiters, by_arbiter  # the arbiters shared the load
    # so did the two classical voters (one consumer group): each read part of the texts, per its metrics port
    assert run.texts_read["classical-1"] > 0 and run.texts_read["classical-2"] > 0, run.texts_read


async def _texts_read(client: httpx.AsyncClient, workers: Iterable[Proc]) -> dict[str, float]:
    """flockwatch_messages_in_total on the texts topic, from each worker's metrics port."""
    read = {}
    for worker in workers:
        text = (await client.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")).text
        read[worker.instance] = sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "flockwatch_messages_in_total" and s.labels.get("topic") == topics.TEXT_SUBMITTED
        )
    return read


async def until_healthy(client: httpx.AsyncClient, proc: Proc | None = None, timeout: float = 30.0) -> None:
    """Until the HTTP service at `client` answers /health with 200; at once an error if `proc`, the process
    serving it, has exited (with its log), and a TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.instance} exited with {proc.popen.returncode}:\n{proc.log.read_text()}")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    log = f":\n{proc.log.read_text()}" if proc is not None else ""
    raise TimeoutError(f"{proc.instance if proc else client.base_url} did not come up within {timeout:g} s{log}")
