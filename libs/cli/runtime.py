"""Run services: all in one process on one bus (embedded), or one per process over a broker."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import uvicorn
import uvloop
from flockwatch.arbiter.app import ArbiterService
from flockwatch.arbiter.settings import ArbiterSettings
from flockwatch.classical_voter.app import ClassicalVoterService
from flockwatch.classical_voter.embedding_app import EmbeddingVoterService
from flockwatch.classical_voter.settings import EmbeddingSettings
from flockwatch.common import heap, telemetry, tracing
from flockwatch.common.bus import Bus, create_bus
from flockwatch.common.forks import protect_from_forks
from flockwatch.common.metrics_http import serve_metrics
from flockwatch.common.service import Service
from flockwatch.common.settings import CommonSettings
from flockwatch.gateway.app import create_app
from flockwatch.gateway.settings import GatewaySettings
from flockwatch.llm_voter.app import LLMVoterService
from flockwatch.llm_voter.settings import LLMSettings
from flockwatch.regex_voter.app import RegexVoterService
from flockwatch.ws_voter.app import WSVoterService

log = logging.getLogger("flockwatch")

SERVICES: dict[str, Callable[[Bus, CommonSettings], Service]] = {
    "regex_voter": lambda bus, s: RegexVoterService(bus, s),
    "classical_voter": lambda bus, s: ClassicalVoterService(bus, s),
    "embedding_voter": lambda bus, s: EmbeddingVoterService(bus, EmbeddingSettings(**s.model_dump())),
    "ws_voter": lambda bus, s: WSVoterService(bus, s),
    "llm_voter": lambda bus, s: LLMVoterService(bus, LLMSettings(**s.model_dump())),
    # the service's own settings: the given common values, its own fields from the environment
    "arbiter": lambda bus, s: ArbiterService(bus, ArbiterSettings(**s.model_dump())),
}
ALL = ["gateway", *SERVICES]


def _feedback(bus: Bus, settings: CommonSettings) -> Service:
    # imported when named: alembic, cleanlab and the Postgres pool stay off the other services' paths
    from flockwatch.feedback.app import FeedbackService
    from flockwatch.feedback.settings import FeedbackSettings

    return FeedbackService(bus, FeedbackSettings(**settings.model_dump()))


def _trainer(bus: Bus, settings: CommonSettings) -> Service:
    from flockwatch.trainer.app import TrainerService
    from flockwatch.trainer.settings import TrainerSettings

    return TrainerService(bus, TrainerSettings(**settings.model_dump()))


# Services that run only when named: they need more than the bus (feedback and trainer need Postgres), so
# the embedded default (`flockwatch serve` with no names, `flockwatch demo`) leaves them out.
ON_DEMAND: dict[str, Callable[[Bus, CommonSettings], Service]] = {"feedback": _feedback, "trainer": _trainer}
KNOWN = [*ALL, *ON_DEMAND]


def build(names: list[str], settings: CommonSettings) -> tuple[Bus, list[Service]]:
    """One bus and the named (non-gateway) services registered on it; on a broker, several share their
    subscriptions (`Bus.cohost`). The embedded default (memory bus) keeps one route per service."""
    unknown = sorted(set(names) - set(KNOWN))
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}; choose from {KNOWN}")
    bus = create_bus(settings)
    factories = {**SERVICES, **ON_DEMAND}
    services = [factories[name](bus, settings) for name in names if name != "gateway"]
    if len(services) > 1 and settings.bus_scheme != "memory":
        bus.cohost()  # services named together on a broker read each topic once (see `Bus.cohost`)
    return bus, services


async def run_workers(bus: Bus, services: list[Service]) -> None:
    """Run bus consumers until SIGINT/SIGTERM."""
    protect_from_forks()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    for service in services:
        await service.start()
    heap.settle()  # the models are loaded: out of the garbage collector's way
    metrics = serve_metrics(bus.settings)  # Prometheus's way in: these services have no HTTP API of their own
    try:
        async with bus:
            log.info("running %s on %s", ", ".join(s.name for s in services), bus.settings.bus_scheme)
            print("ready", flush=True)  # noqa: T201 - a line the process supervisor (and tests) wait for
            await stop.wait()
    finally:
        if metrics is not None:
            metrics[0].shutdown()
            metrics[0].server_close()
    for service in services:
        await service.stop()


def serve(names: list[str], host: str | None = None, port: int | None = None) -> None:
    """Run the named services in this process; with the gateway, behind uvicorn (uvloop + httptools)."""
    protect_from_forks()  # a pool's SIGTERM to its forked workers must not stop this service
    settings = GatewaySettings()
    tracing.configure(settings, f"flockwatch-{names[0]}" if len(names) == 1 else "flockwatch")
    for name in names:
        telemetry.SERVICE_INFO.labels(name, settings.bus_scheme).set(1)
    bus, services = build(names, settings)
    if "gateway" not in names:
        uvloop.run(run_workers(bus, services))
        return
    app = create_app(settings, bus, services)
    uvicorn.run(
        app,
        host=host or settings.gateway_host,
        port=port if port is not None else settings.gateway_port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
