"""The feedback service's HTTP API and review page."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline
from flockwatch.common.auth import harden, require
from flockwatch.common.events import FeedbackSubmitted
from flockwatch.common.metrics_http import HttpTelemetry, metrics_response
from flockwatch.common.problems import INVALID, Problem, use_problem_json
from flockwatch.common.validtext import ValidStr
from flockwatch.feedback import telemetry
from flockwatch.feedback.app import FeedbackService, UnknownLabel, feedback_kind
from flockwatch.feedback.review import conflicts, feedback_groups, review_queue, reviewers, rules_report
from flockwatch.feedback.schemas import (
    Conflicts,
    Duplicates,
    FeedbackHealth,
    FeedbackRecord,
    HygieneRun,
    Labels,
    LastHygiene,
    Reviewers,
    ReviewQueue,
    RuleStatsReport,
)
from flockwatch.feedback.store import TRANSIENT
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)
REVIEW_PAGE = Path(__file__).resolve().parent / "static" / "review.html"


class FeedbackRequest(BaseModel):
    """A correction (true label) or a thumbs up/down for a text."""

    # a label, a thumbs, or both (FeedbackSubmitted checks it), said in the document too
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [{"required": [field], "properties": {field: {"type": "string"}}} for field in ("label", "thumbs")]
        },
    )

    # every string valid Unicode without NUL (Postgres stores no NUL): else 422 saying which field and why
    feedback_id: ValidStr | None = Field(
        None, min_length=1, max_length=200, description="Idempotency key: resending the same id stores it once."
    )
    text_id: ValidStr = Field(min_length=1, max_length=128)
    label: ValidStr | None = Field(None, min_length=1, max_length=64, description="The true label.")
    thumbs: Literal["up", "down"] | None = None
    note: ValidStr | None = Field(None, max_length=2000)
    reviewer_id: ValidStr = Field(min_length=1, max_length=128)


class FeedbackAccepted(BaseModel):
    """Where the feedback is: stored in Postgres, or queued on the bus (Postgres unreachable)."""

    feedback_id: str
    status: Literal["stored", "queued"]
    duplicate: bool = Field(description="This id was already stored (a retry); nothing changed.")


def get_service(request: Request) -> FeedbackService:
    """The service behind the app."""
    service: FeedbackService = request.app.state.service
    return service


ServiceDep = Annotated[FeedbackService, Depends(get_service)]
SAME_CONTENT = ("text_id", "label", "thumbs", "reviewer_id")


async def submit(service: FeedbackService, body: FeedbackRequest) -> FeedbackAccepted:
    """Store first (so the review queue sees it at once), then announce it on the bus; if Postgres is down,
    the bus alone carries it and the consumer stores it later. 202 only once it is in one of the two."""
    try:
        msg = FeedbackSubmitted(
            message_id=body.feedback_id or uuid.uuid4().hex, **body.model_dump(exclude={"feedback_id"})
        )
        service.check_label(msg)
    except (ValidationError, UnknownLabel) as exc:
        raise HTTPException(422, str(exc).splitlines()[0] if isinstance(exc, UnknownLabel) else _errors(exc)) from exc
    try:
        new = await service.store.insert_feedback([service.feedback_row(msg, "http")])
    except TRANSIENT as exc:
        log.warning("feedback: Postgres unreachable (%s); queueing %s on the bus", exc, msg.message_id)
        try:
            await service.bus.publish([msg])
        except Exception as bus_exc:  # noqa: BLE001 - neither store took it: the client must retry
            raise HTTPException(
                503, "neither Postgres nor the bus accepted the feedback; retry", headers={"Retry-After": "1"}
            ) from bus_exc
        telemetry.FEEDBACK_QUEUED.inc()
        return FeedbackAccepted(feedback_id=msg.message_id, status="queued", duplicate=False)
    if not new:
        stored = await service.store.feedback(msg.message_id)
        if stored and any(stored[k] != getattr(msg, k) for k in SAME_CONTENT):
            raise HTTPException(409, f"feedback id {msg.message_id!r} was already used for different feedback")
        telemetry.FEEDBACK_REPEATS.labels("http").inc()
        return FeedbackAccepted(feedback_id=msg.message_id, status="stored", duplicate=True)
    service.count_new([msg], "http")
    try:
        await service.bus.publish([msg])  # for other consumers (the trainer's counters); the row is stored
    except Exception:  # noqa: BLE001 - stored is what the client was promised
        log.warning("feedback: stored %s but could not announce it on the bus", msg.message_id, exc_info=True)
    return FeedbackAccepted(feedback_id=msg.message_id, status="stored", duplicate=False)


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


def _document_labels(app: FastAPI, service: FeedbackService) -> None:
    """List the task's classes as the `label` enum of the OpenAPI document: the labels change with the bundle
    in force, so the document is built again on each request for it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        app.openapi_schema = None
        schema = build()
        if service.task.classes:
            label = schema["components"]["schemas"]["FeedbackRequest"]["properties"]["label"]
            for branch in label.get("anyOf", [label]):
                if branch.get("type") == "string":
                    branch["enum"] = list(service.task.classes)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the document


def create_app(service: FeedbackService) -> FastAPI:
    """The HTTP API of a started feedback service."""
    too_large: dict[int | str, dict[str, Any]] = {
        413: {"model": Problem, "description": "The body is larger than FLOCKWATCH_FEEDBACK_MAX_BODY_BYTES"}
    }
    # a 422 (INVALID) only on the routes that take a body, a path or a query parameter: the others cannot answer one
    app = FastAPIOffline(title="Flockwatch feedback", version="0.1.0", responses=too_large)
    use_problem_json(app)
    app.state.service = service
    harden(app, service.settings, service.settings.feedback_max_body_bytes)
    _document_labels(app, service)
    app.add_middleware(HttpTelemetry, name="feedback")  # outermost: refused requests count too
    # scopes: posting feedback (and reading the labels it may use) → feedback; what reviewers read → review
    # (which includes feedback); running the label check → admin. /review (the page), /health, /metrics: open
    feedback, review, admin = ([Depends(require(scope))] for scope in ("feedback", "review", "admin"))

    refused: dict[int | str, dict[str, Any]] = {
        **INVALID,
        409: {"model": Problem, "description": "This feedback id was already used for different feedback"},
        503: {"model": Problem, "description": "Neither Postgres nor the bus took it; retry after Retry-After"},
    }

    @app.post("/feedback", status_code=202, response_model=FeedbackAccepted, dependencies=feedback, responses=refused)
    async def post_feedback(body: FeedbackRequest, svc: ServiceDep) -> FeedbackAccepted:
        """Record a correction or a thumbs up/down (idempotent by feedback_id)."""
        return await submit(svc, body)

    @app.get("/feedback/conflicts", dependencies=review, response_model=Conflicts)
    async def get_conflicts(svc: ServiceDep) -> dict[str, Any]:
        """Texts (duplicates merged) whose reviewers gave different labels, unresolved ones first."""
        found = conflicts(await feedback_groups(svc.store))
        return {"unresolved": sum(c["status"] == "conflict" for c in found), "conflicts": found}

    @app.get("/feedback/duplicates", dependencies=review, response_model=Duplicates, responses=INVALID)
    async def get_duplicates(svc: ServiceDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """Repeated feedback (same reviewer, text and answer under new ids) and texts stored under several ids."""
        return {
            "repeated_feedback": await svc.store.repeated_feedback(limit),
            "duplicate_texts": await svc.store.duplicate_texts(limit),
        }

    @app.get("/feedback/reviewers", dependencies=review, response_model=Reviewers)
    async def get_reviewers(svc: ServiceDep) -> dict[str, Any]:
        """Per-reviewer agreement with other reviewers, flag rate and agreement with the model."""
        return {"reviewers": reviewers(await feedback_groups(svc.store))}

    @app.get("/feedback/hygiene", dependencies=review, response_model=LastHygiene)
    async def last_hygiene(svc: ServiceDep) -> dict[str, Any]:
        """The newest label-hygiene run (or none yet)."""
        return {"last_run": await svc.store.last_hygiene_run()}

    @app.post("/feedback/hygiene", dependencies=admin, response_model=HygieneRun)
    async def run_hygiene_now(svc: ServiceDep) -> dict[str, Any]:
        """Check the corrections for likely label errors now; flagged ones return to the review queue."""
        return await svc.hygiene()

    @app.get(
        "/feedback/{feedback_id}",
        dependencies=review,
        response_model=FeedbackRecord,
        responses={**INVALID, 404: {"model": Problem, "description": "No feedback has this id"}},
    )
    async def get_feedback(feedback_id: ValidStr, svc: ServiceDep) -> dict[str, Any]:
        """One stored feedback record."""
        found = await svc.store.feedback(feedback_id)
        if found is None:
            raise HTTPException(404, f"no feedback {feedback_id!r}")
        return found

    @app.get("/review/queue", dependencies=review, response_model=ReviewQueue, responses=INVALID)
    async def get_queue(
        svc: ServiceDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 20,
        reviewer: Annotated[
            ValidStr | None, Query(max_length=128, description="Hide what this reviewer labelled")
        ] = None,
    ) -> dict[str, Any]:
        """Texts to review, highest disagreement × harm first."""
        return await review_queue(svc.store, svc.task, limit, reviewer)

    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    async def review_page() -> HTMLResponse:
        return HTMLResponse(REVIEW_PAGE.read_text(encoding="utf-8"))

    @app.get("/labels", dependencies=feedback, response_model=Labels)
    async def get_labels(svc: ServiceDep) -> dict[str, Any]:
        """The task's classes with descriptions and harm weights (empty: any label accepted)."""
        labels = svc.task.labels
        return {
            "task": labels.task if labels else None,
            "labels": [spec.model_dump() for spec in labels.labels] if labels else [],
        }

    @app.get("/rules/stats", dependencies=review, response_model=RuleStatsReport)
    async def get_rule_stats(svc: ServiceDep) -> dict[str, Any]:
        """Each regex rule's fires, precision against reviewed labels (with a 95 % lower bound) and conflicts."""
        return {"rules": [s.as_dict() for s in await rules_report(svc.store, svc.task)]}

    @app.get("/health", response_model=FeedbackHealth)
    async def health(svc: ServiceDep) -> dict[str, Any]:
        """Liveness and whether Postgres answers."""
        try:
            await svc.store.pool.fetchval("SELECT 1")
            database = "ok"
        except TRANSIENT as exc:
            database = f"unreachable: {exc}"
        return {"status": "ok", "database": database, "bus": svc.settings.bus_scheme}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # the rule and queue gauges come from Postgres (every instance reports the same numbers), computed in the
        # background (`gauges.py`): a scrape never queries the database
        return metrics_response()

    return app


__all__ = ["create_app", "feedback_kind"]
