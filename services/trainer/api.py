"""The trainer's HTTP API: request, follow and cancel training runs; drift state; the model registry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi_offline import FastAPIOffline
from flockwatch.common.auth import harden, require
from flockwatch.common.metrics_http import HttpTelemetry, metrics_response
from flockwatch.common.problems import INVALID, Problem, use_problem_json
from flockwatch.common.validtext import ValidStr
from flockwatch.trainer import registry
from flockwatch.trainer.app import RunNotFound, TrainerService
from flockwatch.trainer.store import QueueFull
from pydantic import BaseModel, ConfigDict, Field

MAX_BODY_BYTES = 64 * 1024  # its one body is a small retrain request
NO_RUN: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No training run has this id"}}


class RetrainRequest(BaseModel):
    """A retrain by command."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["full", "recalibrate"] = Field("full", description="full, or calibration-only (voters frozen)")
    reason: ValidStr | None = Field(None, max_length=500, description="Valid Unicode without NUL.")


Status = Literal["queued", "running", "gated", "shadow", "published", "rejected", "failed", "cancelled"]


class TrainingRun(BaseModel):
    """A training run: where it is, what it learned from, what the gate and the rollout decided."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    kind: Literal["full", "recalibrate"]
    trigger: str = Field(description="command, corrections, schedule or drift")
    reason: str | None
    status: Status
    progress: str | None = Field(description="The newest progress line, or why it ended as it did.")
    requested_at: str | None
    started_at: str | None
    finished_at: str | None
    champion_version: str | None = Field(description="The version in force when the run was queued.")
    candidate_version: str | None
    published_version: str | None
    feedback_watermark: int | None = Field(description="The newest feedback seq its data reflects.")
    data: dict[str, Any] | None = Field(description="Base rows, corrections, relabelled, added, held out.")
    gate: dict[str, Any] | None = Field(description="Every check of the gate with its numbers, and the decision.")
    metrics: dict[str, Any] | None
    durations: dict[str, Any] | None
    error: str | None
    rollout: dict[str, Any] | None = Field(description="Shadow verdict, live watch, rollback (rollout.py).")


class TrainerHealth(BaseModel):
    """Liveness, the database, and the champion."""

    status: Literal["ok"]
    database: str = Field(description="ok, or the error reaching Postgres.")
    champion: str | None = Field(description="The version `current` points at.")


def get_service(request: Request) -> TrainerService:
    """The service behind the app."""
    service: TrainerService = request.app.state.service
    return service


ServiceDep = Annotated[TrainerService, Depends(get_service)]


async def _run_or_404(service: TrainerService, run_id: str) -> dict[str, Any]:
    try:
        return await service.run(run_id)
    except RunNotFound as exc:
        raise HTTPException(404, f"no training run {run_id}") from exc


def create_app(service: TrainerService) -> FastAPI:
    """The HTTP API of a started trainer service."""
    app = FastAPIOffline(title="Flockwatch trainer", version="0.1.0", responses=INVALID)
    use_problem_json(app)  # every refusal a problem+json; a 422 says what is wrong without echoing the input
    app.state.service = service
    harden(app, service.settings, MAX_BODY_BYTES)
    app.add_middleware(HttpTelemetry, name="trainer")  # outermost: refused requests count too
    admin = [Depends(require("admin"))]  # every route but /health and /metrics

    @app.post(
        "/training",
        status_code=202,
        dependencies=admin,
        response_model=TrainingRun,
        responses={429: {"model": Problem, "description": "As many runs as allowed are queued already"}},
    )
    async def post_training(body: RetrainRequest, svc: ServiceDep) -> dict[str, Any]:
        """Queue a run (one runs at a time, at most `trainer_max_queued` wait); poll `GET /training/{run_id}`."""
        try:
            return await svc.request_run(body.kind, "command", body.reason)
        except QueueFull as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "60"}) from exc

    @app.get("/training", dependencies=admin, response_model=list[TrainingRun])
    async def list_training(svc: ServiceDep, limit: Annotated[int, Query(ge=1, le=500)] = 20) -> list[dict[str, Any]]:
        """The newest runs first."""
        return await svc.store.runs(limit)

    @app.get("/training/{run_id}", dependencies=admin, response_model=TrainingRun, responses=NO_RUN)
    async def get_training(run_id: ValidStr, svc: ServiceDep) -> dict[str, Any]:
        """A run: status (queued, running, gated, shadow, published, rejected, failed, cancelled), progress, gate,
        rollout."""
        return await _run_or_404(svc, run_id)

    @app.post(
        "/training/{run_id}/cancel",
        dependencies=admin,
        response_model=TrainingRun,
        responses={**NO_RUN, 409: {"model": Problem, "description": "The run has already finished"}},
    )
    async def cancel_training(run_id: ValidStr, svc: ServiceDep) -> dict[str, Any]:
        """Cancel a queued run or stop a running one; 409 for a run that has already finished."""
        run = await _run_or_404(svc, run_id)
        if run["status"] not in ("queued", "running"):
            raise HTTPException(409, f"run {run_id} is {run['status']}; only queued or running runs can be cancelled")
        return await svc.cancel(run_id)

    @app.get("/drift", dependencies=admin)
    async def get_drift(svc: ServiceDep) -> dict[str, Any]:
        """The drift monitor: martingale, its alarm threshold, the windowed KS test, the last alarm."""
        return {**svc.drift.status(), "events": await svc.store.drift_events(10)}

    @app.get("/models", dependencies=admin)
    async def get_models(svc: ServiceDep) -> dict[str, Any]:
        """The versions under the model root, which one is current, and the history."""
        root = svc.settings.models_root
        return {
            "versions": [registry.describe(root, m) for m in registry.versions(root)],
            "history": registry.history(root),
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return metrics_response()

    @app.get("/health", response_model=TrainerHealth)
    async def health(svc: ServiceDep) -> dict[str, Any]:
        """Liveness, the database, and the champion."""
        try:
            await svc.store.pool.fetchval("SELECT 1")
            database = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            database = f"error: {exc}"
        champion = svc.champion()
        return {"status": "ok", "database": database, "champion": champion.name if champion else None}

    return app
