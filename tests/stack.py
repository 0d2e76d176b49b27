"""Build an in-process stack (gateway + services on one bus) for tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import httpx
from flockwatch.cli.runtime import ALL, build
from flockwatch.common.bus import Bus
from flockwatch.gateway.app import create_app
from flockwatch.gateway.settings import GatewaySettings


@asynccontextmanager
async def stack(
    bundle: Path, services: list[str] = ALL, extra: Callable[[Bus], object] = lambda _: None, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Bus]]:
    """An HTTP client on the gateway of a running in-process stack, and its bus; `extra` adds routes."""
    # a cold stack's first votes can take over a second on a loaded 2-core box: unless a test is about the
    # deadline (and sets it), wait long enough that every running voter's vote makes it into the decision
    defaults = {"bus_url": "memory://", "arbiter_deadline_ms": 5000}
    values = {**defaults, **overrides}
    settings = GatewaySettings(model_dir=bundle, **values)
    # the other services' own fields (e.g. arbiter_*) reach them as a deployment gives them: the environment
    own = {f"FLOCKWATCH_{k.upper()}": str(v) for k, v in values.items() if k not in GatewaySettings.model_fields}
    with patch.dict(os.environ, own):
        bus, running = build(services, settings)
    extra(bus)
    app = create_app(settings, bus, running)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, bus
