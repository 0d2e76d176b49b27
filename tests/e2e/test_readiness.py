"""Liveness vs readiness (issue 22): ready means the pipeline can decide — a certified bundle loaded and no
text in flight stalled; live means only that the process answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.security.support import fake_bundle
from tests.stack import stack


async def test_a_running_pipeline_is_ready_and_one_that_cannot_decide_is_not(sms_bundle: Path) -> None:
    async with stack(sms_bundle, gateway_ready_stall_s=0.5) as (client, _):
        assert (await client.post("/predict", json={"text": "see you at 5"})).status_code == 200
        ready = await client.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    # the gateway alone: nothing decides, so a submitted text stalls
    async with stack(sms_bundle, ["gateway"], gateway_ready_stall_s=0.5) as (client, _):
        assert (await client.get("/health/ready")).status_code == 200  # nothing waits yet
        assert (await client.post("/texts", json={"text": "anyone there?"})).status_code == 202
        await asyncio.sleep(0.8)
        stalled = await client.get("/health/ready")
        live = await client.get("/health/live")
    assert stalled.status_code == 503 and "pipeline: a text has waited" in stalled.json()["detail"]
    assert live.status_code == 200 and live.json() == {"status": "alive"}


async def test_a_bundle_that_certifies_nothing_is_not_ready(tmp_path: Path) -> None:
    async with stack(fake_bundle(tmp_path / "bundle"), ["gateway"]) as (client, _):
        response = await client.get("/health/ready")
    assert response.status_code == 503 and "bundle:" in response.json()["detail"]
