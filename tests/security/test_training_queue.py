"""Issue 19, a bounded training queue: a fuzzer queued 368 training runs. At most `trainer_max_queued` runs wait
(a command beyond is a 429 that says why), and an automatic trigger never queues a second run of a kind that is
queued already, even when two fire at once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.security.support import trainer_api


async def _busy(service: Any) -> None:
    """A run in progress, so that the queued ones stay queued (one run at a time)."""
    await service.store.add_run("busy-1", "full", "command", "holds the worker")
    await service.store.update("busy-1", status="running")


async def test_a_command_beyond_the_queue_limit_is_a_429_that_says_why(tmp_path: Path) -> None:
    async with trainer_api(tmp_path, trainer_max_queued=3) as (service, client):
        await _busy(service)
        answers = [await client.post("/training", json={"kind": "full"}) for _ in range(5)]
        assert [a.status_code for a in answers] == [202, 202, 202, 429, 429]
        assert "3 training runs are queued already (limit 3)" in answers[3].json()["detail"]
        assert answers[3].headers["retry-after"]
        assert len(await service.store.active()) == 4  # the running one and three queued
        # a queued run cancelled makes room again
        await client.post(f"/training/{answers[0].json()['run_id']}/cancel")
        assert (await client.post("/training", json={"kind": "recalibrate"})).status_code == 202


async def test_automatic_triggers_reuse_the_queued_run_of_their_kind(tmp_path: Path) -> None:
    async with trainer_api(tmp_path, trainer_max_queued=2) as (service, _):
        await _busy(service)
        # two triggers at once (two trainer instances, or a drift alarm during a check): one run
        first, second = await asyncio.gather(
            service.request_run("recalibrate", "drift", "drift: martingale 120"),
            service.request_run("recalibrate", "drift", "drift: martingale 130"),
        )
        assert first["run_id"] == second["run_id"]
        command = await service.request_run("full", "command", "by hand")
        # the queue is full, but a trigger whose kind is queued gets that run instead of an error
        again = await service.request_run("full", "corrections", "60 new clean corrections")
        assert again["run_id"] == command["run_id"]
        queued = [r for r in await service.store.active() if r["status"] == "queued"]
        assert sorted(r["kind"] for r in queued) == ["full", "recalibrate"]
