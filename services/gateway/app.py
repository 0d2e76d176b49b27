"""The gateway: HTTP in, `TextSubmitted` onto the bus, `Decision` back to the waiting request."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from flockwatch.common import telemetry, topics
from flockwatch.common.bus import Bus, create_bus
from flockwatch.common.events import Decision, TextSubmitted
from flockwatch.common.service import Service
from flockwatch.gateway.decisions import DecisionBook
from flockwatch.gateway.limits import BodyLimit
from flockwatch.gateway.schemas import Accepted, PredictRequest, PredictResponse, Problem
from flockwatch.gateway.settings import GatewaySettings
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ERRORS: dict[int | str, dict[str, object]] = {
    413: {"model": Problem, "description": "Text or body too large"},
    422: {"model": Problem, "description": "Empty or non-text input"},
    503: {"model": Problem, "description": "Too many texts in flight; retry after the Retry-After seconds"},
}


class Gateway:
    """The gateway's state: the bus, the decision book, and admission control."""

    def __init__(self, settings: GatewaySettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.book = DecisionBook(settings.gateway_decisions_kept)
        bus.subscribe(topics.DECISION_MADE, Decision, group="gateway", broadcast=True)(self.on_decisions)

    async def on_decisions(self, decisions: list[Decision]) -> list[Decision]:
        """Resolve the requests waiting for these decisions."""
        self.book.record(decisions)
        return []

    def admit(self, request: PredictRequest) -> TextSubmitted:
        """Check a request and turn it into a message, or raise the HTTP error that explains why not."""
        if not request.text.strip():
            raise HTTPException(422, "text is empty (it must contain a non-space character)")
        if len(request.text) > self.settings.gateway_max_text_chars:
            raise HTTPException(
                413, f"text has {len(request.text)} characters; the limit is {self.settings.gateway_max_text_chars}"
            )
        if self.book.waiting >= self.settings.gateway_max_in_flight:
            raise HTTPException(503, "too many texts in flight; retry shortly", headers={"Retry-After": "1"})
        text_id = request.text_id or uuid.uuid4().hex
        return TextSubmitted(
            message_id=f"text:{text_id}", text_id=text_id, text=request.text, metadata=request.metadata
        )


def get_gateway(request: Request) -> Gateway:
    """The gateway of the running app."""
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


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
            await stack.enter_async_context(bus)
            app.state.gateway = gateway
            yield

    app = FastAPI(title="Flockwatch gateway", version="0.1.0", lifespan=lifespan, responses=ERRORS)
    app.add_middleware(BodyLimit, max_bytes=settings.gateway_max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in exc.errors()
        )
        return JSONResponse({"detail": problems}, status_code=422)

    @app.post("/predict", response_model=PredictResponse, responses={504: {"model": Problem}})
    async def predict(body: PredictRequest, gw: GatewayDep) -> PredictResponse:
        """Classify a text and wait for the decision."""
        msg = gw.admit(body)
        known = gw.book.get(msg.text_id)
        if known is not None:
            return PredictResponse.of(known)
        future = gw.book.wait_for(msg.text_id)
        telemetry.IN_FLIGHT.inc()
        try:
            await gw.bus.publish([msg])
            decision = await asyncio.wait_for(asyncio.shield(future), settings.gateway_predict_timeout_ms / 1000)
        except TimeoutError as exc:
            gw.book.forget_waiter(msg.text_id)
            raise HTTPException(
                504, f"no decision within {settings.gateway_predict_timeout_ms} ms; poll GET /decisions/{msg.text_id}"
            ) from exc
        finally:
            telemetry.IN_FLIGHT.dec()
        return PredictResponse.of(decision)

    @app.post("/texts", status_code=202, response_model=Accepted)
    async def submit(body: PredictRequest, gw: GatewayDep) -> Accepted:
        """Accept a text for classification; the decision appears at the status URL and on the bus."""
        msg = gw.admit(body)
        await gw.bus.publish([msg])
        return Accepted(text_id=msg.text_id, status_url=f"/decisions/{msg.text_id}")

    @app.get("/decisions/{text_id}", response_model=Decision, responses={404: {"model": Problem}})
    async def decision(text_id: str, gw: GatewayDep) -> Decision:
        """The full decision record (votes, versions, thresholds) for a text."""
        found = gw.book.get(text_id)
        if found is None:
            raise HTTPException(404, f"no decision for text {text_id!r} (yet)")
        return found

    @app.get("/health")
    async def health(gw: GatewayDep) -> dict[str, object]:
        """Liveness, the bus kind and the texts in flight."""
        return {"status": "ok", "bus": gw.settings.bus_scheme, "in_flight": gw.book.waiting}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
