"""An HTTP API served by uvicorn inside a running service (the host process owns the signals)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers; `start` returns once it listens, `stop` waits for it to end."""

    _task: asyncio.Task[None] | None = None
    _app: FastAPI | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @classmethod
    def of(cls, app: FastAPI, host: str, port: int) -> EmbeddedServer:
        """A server for `app` (no lifespan: the service owns its resources)."""
        server = cls(uvicorn.Config(app, host=host, port=port, lifespan="off", log_level="warning", access_log=False))
        server._app = app
        return server

    async def start(self, name: str) -> int:
        """Serve in a task; returns the bound port (useful with port 0)."""
        self._task = asyncio.create_task(self.serve(), name=name)
        while not self.started:
            if self._task.done():
                self._task.result()  # raises why it could not start (e.g. the port is taken)
                raise RuntimeError(f"{name}: the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        port: int = self.servers[0].sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        """Ask the server to exit and wait for it."""
        if self._task is not None:
            self.should_exit = True
            await self._task
            self._task = None
        guard = getattr(self._app.state, "guard", None) if self._app else None  # auth.py: rate-limit connections
        if guard is not None:  # (closed here: without a lifespan, the app has no shutdown of its own)
            await guard.aclose()
