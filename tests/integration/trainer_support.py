"""The trainer tests' world: SMS base data without the 'call' spam campaign, a champion trained on it, the
campaign and a poison batch; and a running stack (gateway, voter, arbiter, feedback, trainer) on one bus."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from flockwatch.cli.runtime import build
from flockwatch.common.bus import Bus
from flockwatch.common.datasets import TEST_FRACTION, read_table
from flockwatch.common.service import Service
from flockwatch.feedback.api import create_app as feedback_app
from flockwatch.feedback.app import FeedbackService
from flockwatch.gateway.app import create_app as gateway_app
from flockwatch.gateway.settings import GatewaySettings
from flockwatch.trainer.api import create_app as trainer_app
from flockwatch.trainer.app import TrainerService
from flockwatch.trainer.settings import TrainerSettings

from tests.integration.feedback_support import DSN, fresh_schema, settings_for

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "sms"
CALL = re.compile(r"\bcall\b", re.IGNORECASE)
BASE_ROWS = 1000  # the first rows of data/sms.csv: a small, fast base set


@dataclass(frozen=True)
class World:
    """Base data (no 'call' spam: the campaign the champion never saw), the campaign, the poison, a champion."""

    base_csv: Path
    champion_root: Path  # a model root with one version and `current`; tests copy it
    campaign: list[str]  # 'call' spam from the rest of the file (true label: spam)
    poison: list[str]  # 'call' ham from the rest of the file, which a poisoner labels spam


def make_world(directory: Path, sms_csv: Path) -> World:
    """Write the base data and train the champion on it (classical voters and arbiter, 2 folds)."""
    from flockwatch.trainer.pipeline import TrainConfig, train

    data = read_table(sms_csv, "text", "label")
    rows = list(zip(data.texts, data.labels, strict=True))
    base = [(t, y) for t, y in rows[:BASE_ROWS] if not (y == "spam" and CALL.search(t))]
    live = [(t, y) for t, y in rows[BASE_ROWS:] if len(t) <= 1000]  # (the file has a 28,000-character row)
    campaign = [t for t, y in live if y == "spam" and CALL.search(t)]
    poison = [t for t, y in live if y == "ham" and CALL.search(t)]
    base_csv = directory / "base.csv"
    pd.DataFrame(base, columns=["text", "label"]).to_csv(base_csv, index=False)
    # 250 calibration texts: the shipped 99 % sets and 1 % target hinge on the 3 worst texts and certify
    # nothing; 95 % sets and a 5 % target answer the confident ones
    conformal = directory / "conformal.yaml"
    shipped = (CONFIGS / "conformal.yaml").read_text()
    conformal.write_text(shipped.replace("target: 0.01", "target: 0.05").replace("alpha: 0.01", "alpha: 0.05"))
    root = directory / "models" / "sms"
    labels, slices = CONFIGS / "labels.yaml", CONFIGS / "slices.yaml"
    # as a deployment trains its first champion: the trainer's test share held out (the gate's texts), and
    # calibrated on a held-out share so a calibration-only run has texts the frozen voters never saw
    config = TrainConfig(
        read_table(base_csv, "text", "label"),
        root,
        "sms",
        labels,
        None,
        slices,
        conformal,
        folds=2,
        test_frac=TEST_FRACTION,
        calibration="holdout",
    )
    train(config)
    return World(base_csv, root, campaign, poison)


def copy_models(world: World, directory: Path) -> Path:
    """A model root of the test's own (versions and the `current` link)."""
    root = directory / "sms"
    shutil.copytree(world.champion_root, root, symlinks=True)
    return root


def trainer_settings(world: World, root: Path, schema: str, feedback_schema: str, **overrides: Any) -> TrainerSettings:
    """A trainer on the test's schemas and model root: 2 folds, 60 corrections, quick checks, no HTTP port."""
    values: dict[str, Any] = {
        "bus_url": "memory://",
        "model_dir": root / "current",
        "trainer_database_url": DSN,
        "trainer_db_schema": schema,
        "trainer_feedback_schema": feedback_schema,
        "trainer_serve_http": False,
        "trainer_data": world.base_csv,
        "trainer_folds": 2,
        "trainer_min_corrections": 60,
        "trainer_check_interval_s": 0.3,
        "trainer_settle_s": 1.5,
        "trainer_gate_bootstrap": 1000,
        "trainer_cancel_grace_s": 2.0,
        "batch_wait_ms": 1,
        "instance_id": f"test-{uuid.uuid4().hex[:6]}",
    }
    return TrainerSettings(_env_file=None, **{**values, **overrides})


@dataclass
class Stack:
    """A running stack's clients and services."""

    gateway: httpx.AsyncClient
    feedback: httpx.AsyncClient
    trainer: httpx.AsyncClient
    bus: Bus
    services: dict[str, Service]


def _client(app: Any, name: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{name}", timeout=60)


@asynccontextmanager
async def _own_redis(url: str) -> AsyncIterator[None]:
    """A Redis database for this test alone (streams and join state), emptied before and after."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    await client.flushdb()
    try:
        yield
    finally:
        await client.flushdb()
        await client.aclose()


@asynccontextmanager
async def running_stack(
    world: World, root: Path, bus_url: str = "memory://", **trainer_overrides: Any
) -> AsyncIterator[Stack]:
    """Gateway, classical voter, arbiter, feedback and trainer in this process on one bus; fresh schemas.

    A `redis://…/N` bus must name a database no other test uses: it is flushed before and after."""
    redis = _own_redis(bus_url) if bus_url.startswith("redis") else contextlib.nullcontext()
    async with redis, fresh_schema() as feedback_schema, fresh_schema() as trainer_schema:
        settings = GatewaySettings(
            _env_file=None,
            model_dir=root / "current",
            bus_url=bus_url,
            arbiter_deadline_ms=5000,
            batch_wait_ms=1,
            # the scenario posts 40 texts at once to a stack that shares 2 cores with the trainer's jobs: it tests
            # retraining, not admission control (tests/e2e/test_admission.py does), so no text is shed for waiting
            gateway_shed_after_ms=0,
        )
        bus, services = build(["classical_voter", "arbiter"], settings)
        feedback = FeedbackService(bus, settings_for(feedback_schema, model_dir=root / "current"))
        trainer = TrainerService(
            bus, trainer_settings(world, root, trainer_schema, feedback_schema, **trainer_overrides)
        )
        app = gateway_app(settings, bus, [*services, feedback, trainer])
        async with app.router.lifespan_context(app):
            named = {s.name: s for s in [*services, feedback, trainer]}
            async with (
                _client(app, "gateway") as gateway,
                _client(feedback_app(feedback), "feedback") as fb,
                _client(trainer_app(trainer), "trainer") as tr,
            ):
                yield Stack(gateway, fb, tr, bus, named)


@asynccontextmanager
async def running_trainer(world: World, root: Path, **overrides: Any) -> AsyncIterator[tuple[TrainerService, Any]]:
    """A trainer alone on a memory bus (fresh schemas), with an HTTP client on its API."""
    from flockwatch.common.bus import create_bus

    async with fresh_schema() as feedback_schema, fresh_schema() as trainer_schema:
        settings = trainer_settings(world, root, trainer_schema, feedback_schema, **overrides)
        bus = create_bus(settings)
        trainer = TrainerService(bus, settings)
        await trainer.start()
        try:
            async with bus, _client(trainer_app(trainer), "trainer") as client:
                yield trainer, client
        finally:
            await trainer.stop()


async def wait_until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll `check()` until it returns something truthy; that value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := await check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)
    return value
