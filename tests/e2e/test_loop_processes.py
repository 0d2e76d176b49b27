"""The learning loop as a user runs it: every service its own OS process over the real Redis, feedback and
trainer in one process (`flockwatch serve feedback trainer`) on the real Postgres, corrections over HTTP,
a rollback with `flockwatch models rollback`.

A champion that never saw a 'call' spam campaign serves it; reviewers correct it over HTTP; the volume
trigger starts a retrain, and the feedback+trainer process is SIGKILLed (with its job) mid-run; restarted,
it re-queues the interrupted run, which retrains, passes the gate and publishes; every service process
reloads it and the campaign is decided differently. A poisoner's batch follows (hygiene on, as shipped):
it must not reach the serving model. Then a rollback over the bus restores the first champion's decisions.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis
from flockwatch.client import AsyncClient
from flockwatch.common.kafka_dev import free_port
from flockwatch.trainer import registry

from tests.integration.feedback_support import DSN, fresh_schema
from tests.integration.trainer_support import World, copy_models, make_world, wait_until
from tests.processes import FLOCKWATCH, Proc, until_healthy

pytestmark = pytest.mark.connected
REDIS = "redis://127.0.0.1:6379/6"  # this test's alone (no other test uses db 6): flushed before and after
FINAL = ("published", "rejected", "failed", "cancelled")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, data_files: dict[str, Path]) -> World:
    return make_world(tmp_path_factory.mktemp("loop-world"), data_files["sms"])


@asynccontextmanager
async def stack(world: World, root: Path, logs: Path) -> AsyncIterator[dict[str, Any]]:
    """Gateway, classical voter, arbiter: a process each; feedback+trainer: one process. Fresh Redis db and
    Postgres schemas."""
    state = redis.Redis.from_url(REDIS)
    state.flushdb()
    ports = {"gateway": free_port(), "feedback": free_port(), "trainer": free_port()}
    async with fresh_schema() as feedback_schema, fresh_schema() as trainer_schema:
        env = {
            **os.environ,
            "FLOCKWATCH_BUS_URL": REDIS,
            "FLOCKWATCH_MODEL_DIR": str(root / "current"),
            "FLOCKWATCH_ARBITER_DEADLINE_MS": "5000",
            "FLOCKWATCH_GATEWAY_SHED_AFTER_MS": "0",  # this tests the loop, not admission control
            "FLOCKWATCH_RATE_LIMIT": "",
            "FLOCKWATCH_FEEDBACK_PORT": str(ports["feedback"]),
            "FLOCKWATCH_FEEDBACK_DATABASE_URL": DSN,
            "FLOCKWATCH_FEEDBACK_DB_SCHEMA": feedback_schema,
            "FLOCKWATCH_FEEDBACK_LABELS": str(Path("configs/sms/labels.yaml").resolve()),
            "FLOCKWATCH_TRAINER_PORT": str(ports["trainer"]),
            "FLOCKWATCH_TRAINER_DATABASE_URL": DSN,
            "FLOCKWATCH_TRAINER_DB_SCHEMA": trainer_schema,
            "FLOCKWATCH_TRAINER_FEEDBACK_SCHEMA": feedback_schema,
            "FLOCKWATCH_TRAINER_DATA": str(world.base_csv),
            "FLOCKWATCH_TRAINER_FOLDS": "2",
            "FLOCKWATCH_TRAINER_MIN_CORRECTIONS": "60",
            "FLOCKWATCH_TRAINER_CHECK_INTERVAL_S": "0.5",
            "FLOCKWATCH_TRAINER_SETTLE_S": "1.5",
            "FLOCKWATCH_TRAINER_GATE_BOOTSTRAP": "1000",
            "FLOCKWATCH_TRAINER_DRIFT_ACTION": "false",  # the corrections drive this test
        }
        procs = {
            "classical": Proc("classical_voter", "classical-1", env, logs),
            "arbiter": Proc("arbiter", "arbiter-1", env, logs),
            "gateway": Proc("gateway", "gateway-1", env, logs, ports["gateway"]),
        }
        loop = Proc(["feedback", "trainer"], "loop-1", env, logs, session=True)
        try:
            for proc in (procs["classical"], procs["arbiter"]):
                proc.wait_ready(120)
            urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
            async with (
                httpx.AsyncClient(base_url=urls["gateway"], timeout=60) as gateway,
                httpx.AsyncClient(base_url=urls["feedback"], timeout=60) as feedback,
                httpx.AsyncClient(base_url=urls["trainer"], timeout=60) as trainer,
                AsyncClient(urls["gateway"], feedback_url=urls["feedback"], timeout=60) as client,
            ):
                for http, proc in ((gateway, procs["gateway"]), (feedback, loop), (trainer, loop)):
                    await until_healthy(http, proc, timeout=120)
                yield {
                    "env": env,
                    "logs": logs,
                    "loop": [loop],
                    "client": client,
                    "feedback": feedback,
                    "trainer": trainer,
                    "feedback_schema": feedback_schema,
                }
        finally:
            for proc in [*procs.values(), loop]:
                proc.stop()
            state.flushdb()


async def _predict(client: AsyncClient, texts: list[str], prefix: str) -> list[dict[str, Any]]:
    """Each text's decision, through the Python client (a refusal would raise)."""
    out: list[dict[str, Any]] = []
    for at in range(0, len(texts), 20):
        chunk = enumerate(texts[at : at + 20], start=at)
        replies = await asyncio.gather(*(client.predict(t, text_id=f"{prefix}-{i}") for i, t in chunk))
        out += [r.model_dump() for r in replies]
    return out


async def _label(client: AsyncClient, prefix: str, n: int, label: str, reviewer: str) -> None:
    for at in range(0, n, 20):
        ids = [f"{prefix}-{i}" for i in range(at, min(n, at + 20))]
        replies = await asyncio.gather(*(client.feedback(i, label=label, reviewer_id=reviewer) for i in ids))
        assert all(r.status in ("stored", "queued") for r in replies)


def _spam_rate(decisions: list[dict[str, Any]]) -> float:
    return sum(d["voter_outputs"]["tfidf_lr"]["probabilities"]["spam"] > 0.5 for d in decisions) / len(decisions)


def _let_through(decisions: list[dict[str, Any]]) -> int:
    """Campaign spam answered as ham."""
    return sum(d["prediction"] == "ham" for d in decisions)


async def _runs(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    try:
        reply = await client.get("/training", params={"limit": 50})
    except httpx.TransportError:
        return []  # the process is restarting
    return list(reply.json())[::-1] if reply.status_code == 200 else []


async def _serving(client: AsyncClient, version: str, probe: list[str]) -> bool:
    """A fresh text is decided by `version`'s arbiter and classical voter."""
    (decision,) = await _predict(client, probe[:1], f"probe-{version}-{os.urandom(4).hex()}")
    voter = decision["voter_outputs"].get("tfidf_lr", {}).get("model_version", "")
    return bool(decision["arbiter_version"] == f"arbiter-{version}" and voter.endswith(version))


async def _stored_corrections(schema: str) -> int:
    conn = await asyncpg.connect(DSN)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".feedback'))
    finally:
        await conn.close()


async def test_the_loop_over_processes_survives_a_kill_refuses_poison_and_rolls_back(
    world: World, tmp_path: Path
) -> None:
    root = copy_models(world, tmp_path)
    v1 = registry.current_version(root)
    assert v1 is not None
    campaign = world.campaign
    async with stack(world, root, tmp_path) as s:
        gateway, feedback, trainer = s["client"], s["feedback"], s["trainer"]  # gateway, feedback: flockwatch.client
        before = await _predict(gateway, campaign, "a")
        assert {d["arbiter_version"] for d in before} == {f"arbiter-{v1}"}

        # reviewers correct the campaign over HTTP; the volume trigger starts a run ...
        await _label(gateway, "a", len(campaign), "spam", "rev-1")

        async def running() -> dict[str, Any] | None:
            runs = await _runs(trainer)
            return runs[0] if runs and runs[0]["status"] == "running" else None

        first = await wait_until(running, 120, "the corrections to start a run")
        # ... and the feedback+trainer process dies with its job, mid-run (as a container kill would)
        (loop,) = s["loop"]
        loop.kill()
        restarted = Proc(["feedback", "trainer"], "loop-1", s["env"], s["logs"], session=True)
        s["loop"][0] = restarted
        try:
            await until_healthy(trainer, restarted, timeout=120)
            await until_healthy(feedback, restarted, timeout=120)

            async def retried() -> dict[str, Any] | None:
                runs = await _runs(trainer)
                done = [r for r in runs if first["run_id"] in (r["reason"] or "") and r["status"] in FINAL]
                return done[0] if done else None

            good = await wait_until(retried, 300, "the interrupted run to be retried and finish")
            runs = {r["run_id"]: r for r in await _runs(trainer)}
            assert runs[first["run_id"]]["status"] == "failed"  # interrupted, not lost
            assert good["status"] == "published", str(good)[:3000]
            assert good["data"]["added"] == len(campaign)  # every correction reached the retried run
            v2 = good["published_version"]
            assert registry.current_version(root) == v2

            # every service process reloaded v2 without a restart; the campaign is decided differently
            await wait_until(lambda: _serving(gateway, v2, campaign), 60, "the services to serve v2")
            after = await _predict(gateway, campaign, "b")
            assert {d["arbiter_version"] for d in after} == {f"arbiter-{v2}"}
            assert _let_through(before) > 10 * _let_through(after) and _spam_rate(after) > _spam_rate(before)

            # a poisoner labels ordinary 'call' messages spam: it must not reach the serving model
            await _predict(gateway, world.poison, "p")
            await _label(gateway, "p", len(world.poison), "spam", "mallory")
            assert await _stored_corrections(s["feedback_schema"]) == len(campaign) + len(world.poison)
            reply = await trainer.post("/training", json={"kind": "full", "reason": "after the poison batch"})
            assert reply.status_code == 202, reply.text
            run_id = reply.json()["run_id"]

            async def finished() -> dict[str, Any] | None:
                run = (await trainer.get(f"/training/{run_id}")).json()
                return run if run["status"] in FINAL else None

            poisoned = await wait_until(finished, 300, "the run after the poison batch")
            assert poisoned["status"] == "rejected", str(poisoned)[:3000]
            assert registry.current_version(root) == v2
            still = await _predict(gateway, campaign, "c")
            assert {d["arbiter_version"] for d in still} == {f"arbiter-{v2}"}

            # rollback as a user does it: the CLI re-points `current` and announces it on the bus
            rolled = subprocess.run(
                [FLOCKWATCH, "models", "rollback", "sms", v1, "--root", str(root.parent)],
                env=s["env"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert rolled.returncode == 0, rolled.stdout + rolled.stderr
            await wait_until(lambda: _serving(gateway, v1, campaign), 60, "the services to serve v1 again")
            restored = await _predict(gateway, campaign, "d")
            assert [(d["prediction"], round(d["confidence"], 6)) for d in restored] == [
                (d["prediction"], round(d["confidence"], 6)) for d in before
            ]
            history = [(e["action"], e["version"]) for e in registry.history(root)]
            assert history[-2:] == [("publish", v2), ("rollback", v1)]
        finally:
            restarted.stop()
    print(  # noqa: T201  (numbers for the notes, with -s)
        {
            "campaign": len(campaign),
            "poison": len(world.poison),
            "let through before/after/rollback": [_let_through(x) for x in (before, after, restored)],
            "spam rate before/after": [_spam_rate(before), _spam_rate(after)],
            "good run": {"durations": good["durations"], "gate": good["gate"]["reasons"]},
            "poisoned run": {"gate": poisoned["gate"]["reasons"], "data": poisoned["data"]},
        }
    )
