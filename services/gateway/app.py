"""The gateway: HTTP in, `TextSubmitted` onto the bus, `Decision` back to the waiting request."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, NamedTuple

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from fastapi_offline import FastAPIOffline
from flockwatch.common import heap, telemetry, topics, tracing
from flockwatch.common.auth import harden, require
from flockwatch.common.bus import Bus, BusUnavailable, create_bus
from flockwatch.common.certification import bundle_certification
from flockwatch.common.events import Decision, ModelPublished, TextSubmitted
from flockwatch.common.metrics_http import HttpTelemetry
from flockwatch.common.problems import problem_response, use_problem_json
from flockwatch.common.service import Service
from flockwatch.common.tokens import TokenEntry
from flockwatch.gateway.archive import DecisionArchive
from flockwatch.gateway.cache import PredictionCache, text_hash
from flockwatch.gateway.decisions import DecisionBook
from flockwatch.gateway.schemas import (
    Accepted,
    PredictBatchRequest,
    PredictBatchResponse,
    PredictRequest,
    PredictResponse,
    Problem,
)
from flockwatch.gateway.settings import GatewaySettings
from flockwatch.gateway.shedding import ShedLoad
from flockwatch.gateway.tenancy import Claims, bus_id, tenant_of
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Problem, "description": "No bearer token, or an unknown one (when auth is on)"},
    403: {"model": Problem, "description": "The token lacks the `predict` scope"},
    413: {"model": Problem, "description": "Text or body too large"},
    409: {"model": Problem, "description": "A text_id already used for another text or metadata"},
    429: {
        "model": Problem,
        "description": "The token is over its rate limit or its texts in flight; retry after the Retry-After seconds",
    },
    422: {"model": Problem, "description": "Empty or non-text input, invalid Unicode (lone surrogates) or NUL"},
    503: {"model": Problem, "description": "Too many texts in flight, or the pipeline behind; retry after Retry-After"},
}


class Admitted(NamedTuple):
    """A text let in: the caller's id for it, and the message that carries it (under its bus id)."""

    text_id: str
    msg: TextSubmitted


class Gateway:
    """The gateway's state: the bus, the decision book, and admission control."""

    def __init__(self, settings: GatewaySettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        # a text accepted by POST /texts counts as in flight until decided, or for at most the predict timeout
        self.book = DecisionBook(settings.gateway_decisions_kept, settings.gateway_predict_timeout_ms / 1000)
        self.cache = PredictionCache(settings)
        self.archive = DecisionArchive(settings)
        self.claims = Claims(settings.gateway_decisions_kept)
        bus.subscribe(topics.DECISION_MADE, Decision, group="gateway", broadcast=True)(self.on_decisions)
        bus.subscribe(topics.MODEL_PUBLISHED, ModelPublished, group="gateway", broadcast=True)(self.cache.on_models)

    async def on_decisions(self, decisions: list[Decision]) -> list[Decision]:
        """Resolve the requests waiting for these decisions."""
        await self.archive.keep(decisions)  # first: an answered text's decision is readable after a restart
        self.book.record(decisions)
        await self.cache.store(decisions)
        return []

    async def from_cache(self, msgs: list[TextSubmitted]) -> list[TextSubmitted]:
        """Answer what the prediction cache knows (recorded as decided, waking their waiters); the rest, to publish."""
        hits = await self.cache.lookup(msgs)
        if not hits:
            return msgs
        await self.archive.keep(hits)
        self.book.record(hits)
        answered = {d.text_id for d in hits}
        return [m for m in msgs if m.text_id not in answered]

    def respond(self, decision: Decision, text_id: str) -> PredictResponse:
        """The HTTP answer for a decision, under the caller's id (marked when it came from the cache)."""
        return PredictResponse.of(decision, cached=self.cache.served(decision.text_id), text_id=text_id)

    def admit(self, requests: Sequence[PredictRequest], caller: TokenEntry | None) -> list[Admitted]:
        """The caller's texts if all are valid, none reuses an id for other content, and there is room for all of
        them in flight; else the HTTP error saying why not (callers register them as in flight before their next
        await)."""
        many = len(requests) > 1
        tenant = tenant_of(caller)
        admitted = [self._message(r, tenant, f"texts[{i}]: " if many else "") for i, r in enumerate(requests)]
        first: dict[str, int] = {}
        for i, a in enumerate(admitted):
            if (j := first.setdefault(a.msg.text_id, i)) != i:  # a conflict like an id reused across requests
                raise HTTPException(
                    409,
                    f"texts[{i}]: text_id {a.text_id!r} is also texts[{j}]'s; an id names one text in a batch too",
                )
        contents = [text_hash(a.msg) for a in admitted]
        for i, (a, content) in enumerate(zip(admitted, contents, strict=True)):
            if self.claims.conflicts(a.msg.text_id, content):
                where = f"texts[{i}]: " if many else ""
                raise HTTPException(
                    409,
                    f"{where}text_id {a.text_id!r} was already used for a different text or metadata; an id names "
                    "one text: use a new id (resending the same text and metadata under it is a safe retry)",
                )
        self._check_room(tenant, len(admitted))
        for a, content in zip(admitted, contents, strict=True):
            self.claims.claim(a.msg.text_id, content)
        return admitted

    def _check_room(self, tenant: str | None, n: int) -> None:
        limit = self.settings.gateway_max_in_flight_per_tenant
        if tenant is not None and limit and (mine := self.book.in_flight_of(tenant)) + n > limit:
            telemetry.REFUSED.inc(n)
            raise HTTPException(
                429,
                f"token {tenant!r} has {mine} texts in flight (limit {limit} per token); retry after the Retry-After "
                "seconds",
                headers={"Retry-After": "1"},
            )
        why = self.overloaded(n)
        if why is not None:
            telemetry.REFUSED.inc(n)
            raise HTTPException(503, f"{why}; retry after the Retry-After seconds", headers={"Retry-After": "1"})

    def overloaded(self, n: int) -> str | None:
        """Why `n` more texts may not be admitted now (too many in flight, or the pipeline is behind), or None."""
        in_flight, limit = self.book.in_flight, self.settings.gateway_max_in_flight
        if in_flight + n > limit:
            return f"too many texts in flight ({in_flight} of {limit})"
        waited_ms, shed_ms = self.book.oldest_wait_s * 1000, self.settings.gateway_shed_after_ms
        if shed_ms and waited_ms > shed_ms:
            return f"the pipeline is behind (a text in flight has waited {waited_ms:.0f} ms)"
        return None

    def _message(self, request: PredictRequest, tenant: str | None, where: str) -> Admitted:
        if not request.text.strip():
            raise HTTPException(422, f"{where}text is empty (it must contain a non-space character)")
        limit = self.settings.gateway_max_text_chars
        if len(request.text) > limit:
            raise HTTPException(413, f"{where}text has {len(request.text)} characters; the limit is {limit}")
        text_id = request.text_id or uuid.uuid4().hex
        scoped = bus_id(tenant, text_id)
        msg = TextSubmitted(message_id=f"text:{scoped}", text_id=scoped, text=request.text, metadata=request.metadata)
        return Admitted(text_id, msg)

    async def decide(self, msgs: list[TextSubmitted]) -> tuple[dict[str, Decision], list[str]]:
        """Publish the texts not yet decided and wait for their decisions: (decisions by text id, ids still
        pending when `gateway_predict_timeout_ms` ran out; their decisions will appear at GET /decisions/{id})."""
        decided = {m.text_id: d for m in msgs if (d := self.book.get(m.text_id)) is not None}
        futures: dict[str, asyncio.Future[Decision]] = {}
        new: list[TextSubmitted] = []
        for msg in msgs:
            if msg.text_id not in decided and msg.text_id not in futures:
                if self.book.waiting_for(msg.text_id) is None:
                    new.append(msg)
                futures[msg.text_id] = self.book.wait_for(msg.text_id)
        if not futures:
            return decided, []
        telemetry.IN_FLIGHT.inc(len(futures))
        try:
            try:
                new = await self.from_cache(new)
                await self.bus.publish(new)
            except BaseException:  # not published: nobody will answer these waiters, which would count as in flight
                for msg in new:
                    self.book.forget_waiter(msg.text_id)
                raise
            await asyncio.wait(futures.values(), timeout=self.settings.gateway_predict_timeout_ms / 1000)
        finally:
            telemetry.IN_FLIGHT.dec(len(futures))
        pending = [text_id for text_id, f in futures.items() if not f.done()]
        for text_id in pending:
            self.book.forget_waiter(text_id)
        decided |= {text_id: f.result() for text_id, f in futures.items() if f.done() and not f.cancelled()}
        return decided, pending


def json_response(body: BaseModel) -> Response:
    """`body` as JSON, built once: a route that returns a model has FastAPI validate it against the response
    model again and serialize it through `jsonable_encoder`, which on the predict routes cost as much as the
    rest of the request. The routes still declare their `response_model` (the OpenAPI schema)."""
    return Response(body.model_dump_json(), media_type="application/json")


async def get_gateway(request: Request) -> Gateway:
    """The gateway of the running app (async: FastAPI runs a plain function dependency in a thread pool, a
    thread hand-off per request)."""
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
# every route but /health and /metrics needs `predict`; the token also says whose texts these are
Caller = Annotated[TokenEntry | None, Depends(require("predict"))]


def create_app(
    settings: GatewaySettings | None = None, bus: Bus | None = None, services: Sequence[Service] = ()
) -> FastAPI:
    """The FastAPI app; with `services`, they run in this process on the same bus (embedded mode)."""
    settings = settings or GatewaySettings()
    bus = bus or create_bus(settings)
    gateway = Gateway(settings, bus)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for service in services:
                await service.start()
                stack.push_async_callback(service.stop)
            stack.push_async_callback(guard.aclose)
            await stack.enter_async_context(gateway.cache)
            await stack.enter_async_context(gateway.archive)
            await stack.enter_async_context(bus)
            app.state.gateway = gateway
            heap.settle()  # what start-up loaded (the embedded services' models): out of the collector's way
            yield

    # FastAPI's own OpenTelemetry instrumentation looks for configured providers on every request; the
    # gateway's spans come from `tracing` and its HTTP metrics from `HttpTelemetry`
    native_telemetry_off: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPIOffline(  # /docs and /redoc with their assets served here: they work offline
        title="Flockwatch gateway", version="0.1.0", lifespan=lifespan, responses=ERRORS, telemetry=native_telemetry_off
    )
    use_problem_json(app)
    guard = harden(app, settings, settings.gateway_max_body_bytes)
    app.add_middleware(ShedLoad, overloaded=gateway.overloaded)  # before auth, body limits, routing
    app.add_middleware(HttpTelemetry, name="gateway")  # outermost: refused requests (401, 413, 429) count too

    @app.exception_handler(BusUnavailable)
    async def bus_unavailable(_: Request, exc: BusUnavailable) -> JSONResponse:
        # the broker stayed unreachable through the publish retries: nothing was accepted, the client may retry
        return problem_response(503, f"message bus unavailable; retry shortly ({exc})", {"Retry-After": "2"})

    @app.post("/predict", response_model=PredictResponse, responses={504: {"model": Problem}})
    async def predict(body: PredictRequest, gw: GatewayDep, caller: Caller) -> Response:
        """Classify a text and wait for the decision."""
        ((text_id, msg),) = gw.admit([body], caller)
        with tracing.text_spans("gateway /predict", [msg]):
            decided, _ = await gw.decide([msg])
        if msg.text_id not in decided:
            raise HTTPException(
                504, f"no decision within {settings.gateway_predict_timeout_ms} ms; poll GET /decisions/{text_id}"
            )
        return json_response(gw.respond(decided[msg.text_id], text_id))

    @app.post("/predict/batch", response_model=PredictBatchResponse)
    async def predict_batch(body: PredictBatchRequest, gw: GatewayDep, caller: Caller) -> Response:
        """Classify several texts at once and wait for their decisions; the batch is admitted whole or not at
        all (503). Texts not decided within the timeout come back under `pending` with their status URL."""
        admitted = gw.admit(body.texts, caller)
        msgs = [a.msg for a in admitted]
        with tracing.text_spans("gateway /predict/batch", msgs):
            decided, pending = await gw.decide(msgs)
        late = set(pending)
        return json_response(
            PredictBatchResponse(
                decisions=[gw.respond(decided[m.text_id], t) for t, m in admitted if m.text_id in decided],
                pending=[Accepted(text_id=t, status_url=f"/decisions/{t}") for t, m in admitted if m.text_id in late],
            )
        )

    @app.post("/texts", status_code=202, response_model=Accepted)
    async def submit(body: PredictRequest, gw: GatewayDep, caller: Caller) -> Accepted:
        """Accept a text for classification; the decision appears at the status URL and on the bus."""
        ((text_id, msg),) = gw.admit([body], caller)
        # a retry of a text decided or still in flight is not published again: the pipeline decides an id once,
        # so the copy would count as in flight, waiting for a decision that never comes
        if gw.book.get(msg.text_id) is None and not gw.book.in_flight_for(msg.text_id):
            gw.book.accept([msg.text_id])
            with tracing.text_spans("gateway /texts", [msg]):
                try:
                    await gw.bus.publish(await gw.from_cache([msg]))
                except BaseException:
                    gw.book.unaccept(msg.text_id)
                    raise
        return Accepted(text_id=text_id, status_url=f"/decisions/{text_id}")

    @app.get("/decisions/{text_id}", response_model=Decision, responses={404: {"model": Problem}})
    async def decision(
        text_id: str,
        gw: GatewayDep,
        caller: Caller,
        tenant: Annotated[
            str | None,
            Query(
                max_length=64,
                pattern=r"^[A-Za-z0-9_.@-]+$",
                description="Another token's name, whose decision to read (admin scope only).",
            ),
        ] = None,
    ) -> Decision:
        """The full decision record (votes, versions, thresholds) for one of the caller's texts; with auth on,
        the record's `text_id` is the id on the bus, `<token name>/<text_id>`."""
        owner = tenant_of(caller)
        if tenant is not None and tenant != owner:
            if caller is not None and not caller.grants("admin"):
                raise HTTPException(403, f"token {caller.name!r} reads only its own decisions (tenant needs admin)")
            owner = tenant
        key = bus_id(owner, text_id)
        found = gw.book.get(key) or await gw.archive.get(key)  # the archive: after a restart, or another gateway
        if found is None:
            raise HTTPException(404, f"no decision for text {text_id!r} (yet)")
        return found

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """Liveness: the process answers (restart it when this fails)."""
        return {"status": "alive"}

    @app.get("/health/ready", responses={503: {"model": Problem, "description": "Not ready; `detail` says why"}})
    async def ready(gw: GatewayDep) -> dict[str, object]:
        """Readiness: the pipeline can decide. The bundle in force is loaded and certified (a bundle that abstains
        on every text is not ready), and no text in flight has waited past `FLOCKWATCH_GATEWAY_READY_STALL_S` (a
        dead bus, arbiter or voters show as a stall)."""
        model = await asyncio.to_thread(bundle_certification, gw.settings.model_dir)
        waited, stall = gw.book.oldest_wait_s, gw.settings.gateway_ready_stall_s
        problems = []
        if model.get("certified") is not True:
            problems.append(f"bundle: {model.get('error') or 'certifies nothing: it abstains on every text'}")
        if waited > stall:
            problems.append(f"pipeline: a text has waited {waited:.1f} s for its decision (limit {stall:g} s)")
        if problems:
            raise HTTPException(503, "not ready: " + "; ".join(problems))
        return {"status": "ready", "oldest_wait_s": round(waited, 3), "in_flight": gw.book.in_flight, "model": model}

    @app.get("/health")
    async def health(gw: GatewayDep) -> dict[str, object]:
        """Liveness, the bus kind, the texts in flight, and whether the bundle in force answers at all."""
        model = await asyncio.to_thread(bundle_certification, gw.settings.model_dir)
        status = "ok" if model.get("certified") else "degraded"
        return {"status": status, "bus": gw.settings.bus_scheme, "in_flight": gw.book.in_flight, "model": model}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
