"""Fixtures' helpers for the feedback service tests: a fresh Postgres schema per test, a started service."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from flockwatch.common.bus import create_bus
from flockwatch.feedback.api import create_app
from flockwatch.feedback.app import FeedbackService
from flockwatch.feedback.settings import FeedbackSettings

ROOT = Path(__file__).resolve().parents[2]
DSN = os.environ.get("FLOCKWATCH_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[str]:
    """A new, empty schema name; dropped (with everything in it) afterwards."""
    try:
        conn = await asyncpg.connect(DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL at {DSN} ({exc}); set FLOCKWATCH_TEST_DATABASE_URL")
    name = f"fwtest_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


def settings_for(schema: str, **overrides: Any) -> FeedbackSettings:
    """Settings for a test service: the SMS labels and rules, no HTTP server unless asked, quick batches."""
    values: dict[str, Any] = {
        "bus_url": "memory://",
        "feedback_db_schema": schema,
        "feedback_database_url": DSN,
        "feedback_serve_http": False,
        "feedback_labels": ROOT / "configs" / "sms" / "labels.yaml",
        "feedback_rules": ROOT / "configs" / "sms" / "rules.yaml",
        "feedback_hygiene_every": 0,
        "feedback_db_retry_s": 5.0,
        "batch_wait_ms": 1,
        "instance_id": f"test-{uuid.uuid4().hex[:6]}",
    }
    return FeedbackSettings(_env_file=None, **{**values, **overrides})  # type: ignore[call-arg]


@asynccontextmanager
async def running_service(schema: str, **overrides: Any) -> AsyncIterator[FeedbackService]:
    """A started feedback service on its own bus (memory unless `bus_url` says otherwise)."""
    settings = settings_for(schema, **overrides)
    bus = create_bus(settings)
    service = FeedbackService(bus, settings)
    await service.start()
    try:
        async with bus:
            yield service
    finally:
        await service.stop()


@asynccontextmanager
async def api_client(service: FeedbackService) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the service's API in this process (ASGI transport); the app's auth guard closed after."""
    app = create_app(service)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:
            yield client
    finally:
        await app.state.guard.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until `check()` is true (the bus consumers run concurrently)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.02)


async def count(service: FeedbackService, table: str) -> int:
    """Rows in one of the service's tables."""
    return int(await service.store.pool.fetchval(f"SELECT count(*) FROM {table}"))
