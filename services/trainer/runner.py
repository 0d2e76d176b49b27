"""A training run's process: started from its spec, progress read from its stdout, terminated to cancel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from flockwatch.trainer.job import RESULT, JobSpec


class JobFailed(RuntimeError):
    """The run's process ended without a result (it raised, crashed, or was killed)."""


class JobProcess:
    """`python -m flockwatch.trainer.job SPEC` in a session of its own, so cancel stops it and its children."""

    def __init__(self, spec: JobSpec, on_progress: Callable[[str], Awaitable[None]]) -> None:
        self.spec = spec
        self.on_progress = on_progress
        self.proc: asyncio.subprocess.Process | None = None
        self.cancelled = False

    @property
    def spec_path(self) -> Path:
        """Where the spec is written (the result lands beside it)."""
        return self.spec.work_dir / "spec.json"

    async def run(self) -> dict[str, Any]:
        """Run to the end; the result record, or JobFailed with the process's last words."""
        if self.cancelled:
            raise JobFailed("cancelled")
        self.spec.work_dir.mkdir(parents=True, exist_ok=True)
        self.spec_path.write_text(self.spec.model_dump_json(indent=1), encoding="utf-8")
        log_path = self.spec.work_dir / "job.log"
        with log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "flockwatch.trainer.job",
                str(self.spec_path),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
            if self.cancelled:  # cancelled while the process was starting
                await self.terminate(0)
            assert self.proc.stdout is not None
            async for line in self.proc.stdout:
                await self._progress(line)
            code = await self.proc.wait()
        result_path = self.spec.work_dir / RESULT
        if self.cancelled:
            raise JobFailed("cancelled")
        if not result_path.exists():
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise JobFailed(f"the run's process exited with {code} and no result: {tail}")
        result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
        if "error" in result:
            raise JobFailed(result["error"])
        return result

    async def _progress(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return  # a library's print, not ours
        if isinstance(message, dict) and "progress" in message:
            await self.on_progress(str(message["progress"]))

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM the run's process group; SIGKILL it if it is still there after `grace_s`."""
        self.cancelled = True
        proc = self.proc
        if proc is None or proc.returncode is not None:  # not started yet: `run` stops it as soon as it is
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
