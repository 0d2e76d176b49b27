"""The trainer service on the real Postgres (fresh schemas per test) and the memory bus, with a live stack.

The champion is trained on SMS base data that lacks the 'call' spam campaign; the campaign then arrives,
reviewers correct it, the trainer retrains, gates and publishes, and the live arbiter and voter reload it.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from flockwatch.common.datasets import split_of
from flockwatch.common.events import Decision
from flockwatch.trainer import migrate, registry

from tests.integration.feedback_support import DSN, fresh_schema
from tests.integration.trainer_support import (
    World,
    copy_models,
    make_world,
    running_stack,
    running_trainer,
    wait_until,
)

FINAL = ("published", "rejected", "failed", "cancelled")
# the scenario's bus: in process by default; FLOCKWATCH_TEST_TRAINER_BUS=redis://127.0.0.1:6379/10 runs it over
# Redis Streams (database 10 is this test's alone: it is flushed before and after). On a loaded 2-core CI box
# the Redis run can decide a reloaded text at its deadline before the classical vote arrives, which this
# scenario's assertions do not allow for; it passes on a quiet box.
BUS = os.environ.get("FLOCKWATCH_TEST_TRAINER_BUS", "memory://")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, data_files: dict[str, Path]) -> World:
    return make_world(tmp_path_factory.mktemp("trainer-world"), data_files["sms"])


@pytest.fixture
def root(world: World, tmp_path: Path) -> Path:
    return copy_models(world, tmp_path)


async def _predict(client: httpx.AsyncClient, texts: list[str], prefix: str) -> list[dict[str, Any]]:
    """Decisions for every text (concurrently, in chunks); each must come back."""
    out: list[dict[str, Any]] = []
    for at in range(0, len(texts), 40):
        replies = await asyncio.gather(
            *(
                client.post("/predict", json={"text_id": f"{prefix}-{i}", "text": t})
                for i, t in enumerate(texts[at : at + 40], start=at)
            )
        )
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200][:2]
        out += [r.json() for r in replies]
    return out


async def _label(client: httpx.AsyncClient, prefix: str, n: int, reviewer: str) -> None:
    for at in range(0, n, 40):
        replies = await asyncio.gather(
            *(
                client.post("/feedback", json={"text_id": f"{prefix}-{i}", "label": "spam", "reviewer_id": reviewer})
                for i in range(at, min(n, at + 40))
            )
        )
        assert all(r.status_code == 202 for r in replies)


def _spam_rate(decisions: list[dict[str, Any]]) -> float:
    """Share of texts the tfidf_lr voter scores as spam (what the bundle's models think, answered or not)."""
    return sum(d["voter_outputs"]["tfidf_lr"]["probabilities"]["spam"] > 0.5 for d in decisions) / len(decisions)


def _answered(decisions: list[dict[str, Any]], label: str | None) -> int:
    return sum(d["prediction"] == label for d in decisions)


async def _finished_run(client: httpx.AsyncClient, n: int, timeout: float = 180) -> dict[str, Any]:
    """The n-th run (oldest first) once it has finished."""

    async def check() -> dict[str, Any] | None:
        runs = (await client.get("/training", params={"limit": 50})).json()[::-1]
        return runs[n] if len(runs) > n and runs[n]["status"] in FINAL else None

    return dict(await wait_until(check, timeout, f"run #{n + 1} to finish"))


async def _reloaded(stack: Any, version: str) -> None:
    arbiter, voter = stack.services["arbiter"], stack.services["classical_voter"]

    async def check() -> bool:
        return bool(arbiter.policy.version == f"arbiter-{version}" and voter.core.version.endswith(version))

    await wait_until(check, 30, f"the arbiter and the voter to load {version}")


async def test_corrections_retrain_publish_reload_then_poison_rejected_and_rollback(world: World, root: Path) -> None:
    v1 = registry.current_version(root)
    assert v1 is not None
    async with running_stack(world, root, BUS, trainer_drift_action=False) as stack:
        before = await _predict(stack.gateway, world.campaign, "a")
        assert {d["arbiter_version"] for d in before} == {f"arbiter-{v1}"}
        # the campaign is a shift the drift monitor sees (its action is off here: the corrections drive this test)
        drift = await wait_until(lambda: _drift_alarm(stack.trainer), 15, "a drift alarm on the campaign")
        assert drift["action"] == "none" and drift["martingale"] >= 100

        # reviewers correct the campaign; 60 new clean corrections trigger a full retrain
        await _label(stack.feedback, "a", len(world.campaign), "rev-1")
        good = await _finished_run(stack.trainer, 0)
        assert (good["trigger"], good["kind"], good["status"]) == ("corrections", "full", "published"), str(good)[:3000]
        v2 = good["published_version"]
        assert good["gate"]["passed"] and good["champion_version"] == v1
        assert registry.current_version(root) == v2
        assert good["data"]["added"] == len(world.campaign) and good["data"]["held_out_dropped_leaks"] == 0

        # the live arbiter and voter reloaded it without a restart, and decide the campaign differently: no
        # campaign spam is let through as ham any more, and the voters call it spam
        await _reloaded(stack, v2)
        after = await _predict(stack.gateway, world.campaign, "b")
        assert {d["arbiter_version"] for d in after} == {f"arbiter-{v2}"}
        held_out = [i for i, t in enumerate(world.campaign) if split_of(t) == "test"]  # never trained on
        # (a regularized model may still miss one it trained on)
        assert _answered(before, "ham") > 10 * _answered(after, "ham") and _answered(after, "ham") <= len(after) // 50
        assert _spam_rate(after) > _spam_rate(before)
        assert _spam_rate([after[i] for i in held_out]) >= _spam_rate([before[i] for i in held_out])

        # a poisoner labels ordinary 'call' messages spam: retrained, gated, rejected; v2 keeps serving
        await _predict(stack.gateway, world.poison, "p")
        await _label(stack.feedback, "p", len(world.poison), "mallory")
        poisoned = await _finished_run(stack.trainer, 1)
        assert (poisoned["trigger"], poisoned["status"]) == ("corrections", "rejected"), poisoned
        assert "macro_f1_reference" in poisoned["gate"]["reasons"]
        assert registry.current_version(root) == v2
        candidate = root / ".runs" / poisoned["run_id"] / "candidates" / poisoned["candidate_version"]
        manifest = json.loads((candidate / "manifest.json").read_text())
        assert manifest["parent"] == v2 and manifest["metrics"]["gate"]["passed"] is False

        # rollback to v1: re-pointed, announced, reloaded; the decisions are v1's again
        await stack.bus.publish([registry.announcement(registry.rollback(root, v1, by="test"))])
        await _reloaded(stack, v1)
        restored = await _predict(stack.gateway, world.campaign, "c")
        assert [(d["prediction"], round(d["confidence"], 6)) for d in restored] == [
            (d["prediction"], round(d["confidence"], 6)) for d in before
        ]
        history = [(e["action"], e["version"]) for e in registry.history(root)]
        assert history[-2:] == [("publish", v2), ("rollback", v1)]
    _report(before, after, restored, good, poisoned, drift, held_out)


async def _drift_alarm(client: httpx.AsyncClient) -> dict[str, Any] | None:
    events = (await client.get("/drift")).json()["events"]
    return dict(events[-1]) if events else None


def _report(before: Any, after: Any, restored: Any, good: Any, poisoned: Any, drift: Any, held_out: Any) -> None:
    """What the scenario measured (printed with -s; README numbers come from here)."""
    rows = {
        "campaign spam (tfidf_lr) before/after/rollback": [_spam_rate(x) for x in (before, after, restored)],
        "campaign answered spam/ham/abstained before": [_answered(before, c) for c in ("spam", "ham", None)],
        "campaign answered spam/ham/abstained after": [_answered(after, c) for c in ("spam", "ham", None)],
        "held-out campaign spam before/after": [_spam_rate([x[i] for i in held_out]) for x in (before, after)],
        "good run": {"gate": good["gate"]["checks"], "durations": good["durations"]},
        "poisoned run": {"gate": poisoned["gate"]["checks"], "durations": poisoned["durations"]},
        "first drift alarm during the campaign": drift,
    }
    print(json.dumps(rows, indent=1, default=str))  # noqa: T201


async def test_cancel_stops_the_running_process_and_a_queued_run(world: World, root: Path) -> None:
    async with running_trainer(world, root) as (trainer, client):
        first = (await client.post("/training", json={"reason": "by hand"})).json()
        second = (await client.post("/training", json={"kind": "full"})).json()
        assert first["status"] == "queued" and first["trigger"] == "command"

        async def training() -> bool:
            run = (await client.get(f"/training/{first['run_id']}")).json()
            return run["status"] == "running" and "classical" in (run["progress"] or "")

        await wait_until(training, 60, "the first run to be training")
        assert (await client.get(f"/training/{second['run_id']}")).json()["status"] == "queued"  # one at a time
        job = trainer._job  # noqa: SLF001 - the process we want to see stopped
        assert job is not None and job.proc is not None
        pid = job.proc.pid
        assert (await client.post(f"/training/{second['run_id']}/cancel")).json()["status"] == "cancelled"
        cancelled = (await client.post(f"/training/{first['run_id']}/cancel")).json()
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not (root / ".runs" / first["run_id"]).exists()
        assert (await client.post(f"/training/{first['run_id']}/cancel")).status_code == 409
        assert (await client.get("/training/nope")).status_code == 404
        assert registry.current_version(root) == (await client.get("/health")).json()["champion"]


async def test_drift_queues_a_recalibration_then_a_full_retrain(world: World, root: Path) -> None:
    async with running_trainer(world, root, trainer_drift_delta=0.01) as (trainer, client):
        status = (await client.get("/drift")).json()
        assert status["enabled"] and status["n_reference"] > 100 and not status["alarm"]

        async def drifted(tag: str) -> None:
            """Decisions of the champion's arbiter far less confident than on its calibration texts."""

            async def ready() -> bool:  # a published recalibration restarts the monitor on the new champion
                return trainer.drift.monitor is not None

            await wait_until(ready, 60, "the drift monitor of the champion")
            assert trainer.drift.monitor is not None
            version = trainer.drift.monitor.state.version
            events = [
                Decision(
                    message_id=f"decision:{tag}-{i}",
                    text_id=f"{tag}-{i}",
                    prediction=None,
                    confidence=0.5 + 0.3 * ((i * 7919) % 100) / 100,
                    abstain=True,
                    abstain_reason="drift test",
                    prediction_set=["ham", "spam"],
                    path="combiner",
                    votes=[],
                    arbiter_version=version,
                    thresholds={},
                    latency_ms=1.0,
                )
                for i in range(150)
            ]
            await trainer.bus.publish(events)

        await drifted("d1")
        recal = await _finished_run(client, 0, timeout=120)
        assert (recal["trigger"], recal["kind"]) == ("drift", "recalibrate"), recal
        assert recal["status"] in ("published", "rejected"), recal
        assert {c["name"] for c in recal["gate"]["checks"]} >= {"ece_gain", "macro_f1", "worst_slice_f1"}
        await drifted("d2")  # the drift outlives the recalibration: next comes a full retrain
        runs = await wait_until(lambda: _runs(client, 2), 30, "a second drift run")
        assert (runs[1]["trigger"], runs[1]["kind"]) == ("drift", "full")
        await client.post(f"/training/{runs[1]['run_id']}/cancel")
        events = (await client.get("/drift")).json()["events"]
        assert [e["action"] for e in events[::-1]] == ["recalibrate", "full"]
        assert all(e["martingale"] >= 100 for e in events)
    print(json.dumps({"recalibration": {k: recal[k] for k in ("status", "gate", "durations")}}, default=str))  # noqa: T201


async def _runs(client: httpx.AsyncClient, n: int) -> list[dict[str, Any]] | None:
    runs = (await client.get("/training")).json()[::-1]
    return runs if len(runs) >= n else None


async def test_trainer_migrations_are_idempotent_and_reversible() -> None:
    async with fresh_schema() as schema:
        await migrate.upgrade_async(DSN, schema)
        await migrate.upgrade_async(DSN, schema)  # a second instance starting: nothing to do
        conn = await asyncpg.connect(DSN)
        try:
            sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = $1"
            assert {r[0] for r in await conn.fetch(sql, schema)} == {
                "training_runs",
                "drift_events",
                "shadow_decisions",
                "alembic_version",
            }
            assert await conn.fetchval(f'SELECT version_num FROM "{schema}".alembic_version') == "t0002"
            await asyncio.to_thread(migrate.downgrade, DSN, schema)
            assert {r[0] for r in await conn.fetch(sql, schema)} == {"alembic_version"}
        finally:
            await conn.close()


async def test_a_run_killed_mid_way_consumed_no_correction_and_is_queued_again(world: World, root: Path) -> None:
    """The trainer died while a run held corrections up to seq 50: after the restart those corrections are
    still new (the watermark counts completed runs only), and the run is queued again, once."""
    from flockwatch.common.bus import create_bus
    from flockwatch.trainer.app import RETRY, TrainerService

    async with running_trainer(world, root, trainer_check_interval_s=3600) as (trainer, _):
        store = trainer.store
        rows = [
            ("done-1", "corrections", "60 new clean corrections", "published", 10),
            ("dead-1", "corrections", "70 new clean corrections", "running", 50),
            ("dead-2", "command", f"{RETRY} x (a retry that died too)", "running", 60),
        ]
        # written in their final state at once: a queued row could be claimed by the running trainer's worker
        await store.pool.executemany(
            "INSERT INTO training_runs (run_id, kind, trigger, reason, status, feedback_watermark) "
            "VALUES ($1, 'full', $2, $3, $4, $5)",
            rows,
        )
        assert await store.watermark() == 10  # what the dead runs held is not consumed

        restarted = TrainerService(create_bus(trainer.settings), trainer.settings)  # the next start
        await restarted.start()
        try:
            runs = {r["run_id"]: r for r in await store.runs(limit=20)}
            assert runs["dead-1"]["status"] == runs["dead-2"]["status"] == "failed"
            retries = [r for r in runs.values() if (r["reason"] or "").startswith(f"{RETRY} dead-1")]
            assert len(retries) == 1 and retries[0]["kind"] == "full" and retries[0]["trigger"] == "corrections"
            assert not [r for r in runs.values() if (r["reason"] or "").startswith(f"{RETRY} dead-2")]
            for run in await store.active():
                await restarted.cancel(run["run_id"])
        finally:
            await restarted.stop()


async def test_shadow_then_promotion_then_a_live_regression_rolls_back(world: World, root: Path) -> None:
    """A challenger that passed the gate decides live texts in shadow (the champion keeps serving), is promoted
    once it has seen enough, and is rolled back when the corrections of its live answers say it does worse."""
    v1 = registry.current_version(root)
    shadow_n, watch_n = 40, 30
    overrides = {"trainer_shadow_texts": shadow_n, "trainer_watch_corrections": watch_n, "trainer_drift_action": False}
    async with running_stack(world, root, BUS, **overrides) as stack:
        await _predict(stack.gateway, world.campaign, "a")
        await _label(stack.feedback, "a", len(world.campaign), "rev-1")

        async def in_shadow() -> dict[str, Any] | None:
            runs = (await stack.trainer.get("/training")).json()
            return runs[0] if runs and runs[0]["status"] == "shadow" else None

        held = await wait_until(in_shadow, 180, "the gated challenger to go into shadow")
        assert held["gate"]["passed"] and registry.current_version(root) == v1  # not served yet
        live = await _predict(stack.gateway, world.campaign[: shadow_n + 10], "s")
        assert {d["arbiter_version"] for d in live} == {f"arbiter-{v1}"}  # the champion served them
        promoted = await _finished_run(stack.trainer, 0)
        assert promoted["status"] == "published", str(promoted)[:3000]
        shadow = promoted["rollout"]["shadow"]["verdict"]
        assert shadow["passed"] and shadow["n"] == shadow_n
        # on the campaign the champion let spam through: the challenger disagrees, and the corrections back it
        assert shadow["corrected"] == 0 or shadow["challenger_wrong"] <= shadow["champion_wrong"]
        v2 = promoted["published_version"]
        assert registry.current_version(root) == v2 and promoted["rollout"]["watch"]["previous"] == v1
        await _reloaded(stack, v2)

        # live corrections then say v2's spam answers are wrong (as after a bad release): rolled back to v1
        answered = [d for d in await _predict(stack.gateway, world.campaign, "w") if d["prediction"] == "spam"]
        assert len(answered) >= watch_n
        for at in range(0, watch_n, 20):
            replies = await asyncio.gather(
                *(
                    stack.feedback.post(
                        "/feedback", json={"text_id": d["text_id"], "label": "ham", "reviewer_id": "r2"}
                    )
                    for d in answered[at : min(watch_n, at + 20)]
                )
            )
            assert all(r.status_code == 202 for r in replies)

        async def rolled_back() -> dict[str, Any] | None:
            run = (await stack.trainer.get(f"/training/{promoted['run_id']}")).json()
            return run if run["rollout"]["watch"]["state"] != "watching" else None

        watched = await wait_until(rolled_back, 60, "the live watch to judge v2")
        verdict = watched["rollout"]["watch"]["verdict"]
        assert watched["rollout"]["watch"]["state"] == "rolled back", verdict
        assert verdict["wrong"] >= watch_n and verdict["p_value"] < 0.05
        assert registry.current_version(root) == v1
        last = registry.history(root)[-1]
        assert (last["action"], last["version"], last["by"]) == ("rollback", v1, "trainer") and "Fisher" in last[
            "reason"
        ]
        await _reloaded(stack, v1)
