"""OpenTelemetry tracing across the bus: W3C trace context in message headers, one span per text per hop.

Off by default (`FLOCKWATCH_TRACING=off`): the bus then tests `ENABLED` and does nothing else. When on, each
text's path is one trace: the gateway's span → a `send` span per published message (its context goes into the
message's `traceparent` header) → in every consumer a `process` span per message, the child of that header's
context → the `send` spans of what the handler publishes for the same text → … → the decision back at the
gateway. Handlers work on batches, so the bus also opens a `batch` span per handler call, linked to every
message's context (and each per-message span links back to it); handlers never see any of this.
"""

from __future__ import annotations

import contextvars
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from flockwatch.common.events import DeadLetter, Decision, Event, Vote, VoteRequested
from flockwatch.common.settings import CommonSettings
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)
ENABLED = False  # read by the bus on every publish and batch: the whole cost of tracing when it is off
RECENT_TEXTS = 50_000  # per process: the last span context seen for each text (for publishes outside a handler)

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: trace.Tracer = trace.NoOpTracer()
_provider: TracerProvider | None = None
# text key → context, for the handler call (or gateway request) running in this task
_CURRENT: contextvars.ContextVar[dict[str, Context] | None] = contextvars.ContextVar("flockwatch_texts", default=None)
# text key → context of the newest span for that text in this process: the arbiter's deadline ticker decides
# outside any handler call and still continues the text's trace
_RECENT: OrderedDict[str, Context] = OrderedDict()


def exporter_for(settings: CommonSettings) -> SpanExporter | None:
    """The span exporter `settings.tracing` names; None for off."""
    if settings.tracing == "console":
        return ConsoleSpanExporter()
    if settings.tracing == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint
        if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return OTLPSpanExporter(endpoint=endpoint)  # None: OTEL_EXPORTER_OTLP_* variables, or localhost:4318
    return None


def configure(settings: CommonSettings, service: str) -> None:
    """Turn tracing on as `settings` say (a batching exporter, parent-based sampling); off leaves it off."""
    exporter = exporter_for(settings)
    if exporter is None:
        return
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "service.instance.id": settings.instance_id}),
        sampler=ParentBased(TraceIdRatioBased(settings.tracing_sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # libraries instrumented with OpenTelemetry join the same traces
    use(provider)
    log.info("tracing: %s exporter, %.0f %% of texts sampled", settings.tracing, 100 * settings.tracing_sample_ratio)


def use(provider: TracerProvider) -> None:
    """Trace with `provider` (tests pass one with an in-memory exporter)."""
    global ENABLED, _tracer, _provider
    _provider, _tracer, ENABLED = provider, provider.get_tracer("flockwatch"), True


def disable() -> None:
    """Back to off: flush what the provider holds and forget the texts seen."""
    global ENABLED, _tracer, _provider
    if _provider is not None:
        _provider.force_flush()
    ENABLED, _tracer, _provider = False, trace.NoOpTracer(), None
    _RECENT.clear()


def _remember(key: str, ctx: Context) -> None:
    _RECENT[key] = ctx
    _RECENT.move_to_end(key)
    if len(_RECENT) > RECENT_TEXTS:
        _RECENT.popitem(last=False)


def _text_id(event: Event) -> str | None:
    text_id = getattr(event, "text_id", None)
    return text_id if isinstance(text_id, str) else None


def _event_attributes(event: Event, scheme: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": scheme,
        "messaging.destination.name": event.TOPIC,
        "messaging.operation.type": "send",
        "messaging.message.id": event.message_id,
        "flockwatch.event": type(event).__name__,
    }
    if (text_id := _text_id(event)) is not None:
        attrs["flockwatch.text_id"] = text_id
    if isinstance(event, Vote):
        attrs["flockwatch.voter"] = event.voter
        attrs["flockwatch.abstain"] = event.abstain
        if event.probabilities:
            attrs["flockwatch.prediction"] = max(event.probabilities, key=event.probabilities.__getitem__)
    elif isinstance(event, Decision):
        attrs |= {
            "flockwatch.prediction": event.prediction or "",
            "flockwatch.abstain": event.abstain,
            "flockwatch.confidence": event.confidence,
            "flockwatch.path": event.path,
            "flockwatch.cascade_rounds": len(event.rounds),
            "flockwatch.latency_ms": event.latency_ms,
        }
    elif isinstance(event, VoteRequested):
        attrs |= {"flockwatch.tier": event.tier, "flockwatch.voters": list(event.voters)}
    return attrs


def _child(name: str, parent: Context, kind: SpanKind, links: Sequence[Link] = ()) -> Span:
    """A span under `parent`; under an unsampled parent no span at all, the parent's context carried on (an
    unsampled text then costs a header read and write per hop, not a span)."""
    above = trace.get_current_span(parent).get_span_context()
    if above.is_valid and not above.trace_flags.sampled:
        return trace.NonRecordingSpan(above)
    return _tracer.start_span(name, context=parent, kind=kind, links=links)


def _parent_of(event: Event, current: dict[str, Context] | None) -> Context:
    """The span of the handler that made this event (`parents_of`), else the handler's span for its text, else
    the newest span for it here, else the active span (or none)."""
    made_by = _MADE_BY.get()
    if made_by and (ctx := made_by.get(id(event))) is not None:
        return ctx
    key = event.key
    return (current.get(key) if current else None) or _RECENT.get(key) or otel_context.get_current()


# event id → the context of the handler span that made it: co-hosted services (`Bus.cohost`) handle one batch in
# their own spans and publish together, each output still the child of its own service's span
_MADE_BY: contextvars.ContextVar[dict[int, Context] | None] = contextvars.ContextVar("flockwatch_made_by", default=None)


def parents_of(events: Sequence[Event]) -> dict[int, Context]:
    """Inside a handler's `consuming` span: the context each of its outputs continues (see `made_by`)."""
    current = _CURRENT.get()
    return {id(event): _parent_of(event, current) for event in events}


@contextmanager
def made_by(parents: dict[int, Context]) -> Iterator[None]:
    """Publish events made by handlers that ran in other spans (`parents_of` from each)."""
    token = _MADE_BY.set(parents)
    try:
        yield
    finally:
        _MADE_BY.reset(token)


@contextmanager
def sending(events: Sequence[Event], scheme: str) -> Iterator[list[dict[str, str]]]:
    """A `send` span per event, child of its text's current span; yields each event's message headers."""
    current = _CURRENT.get()
    spans: list[Span] = []
    carriers: list[dict[str, str]] = []
    for event in events:
        span = _child(f"send {event.TOPIC}", _parent_of(event, current), SpanKind.PRODUCER)
        if span.is_recording():
            span.set_attributes(_event_attributes(event, scheme))
            if isinstance(event, DeadLetter):
                span.set_status(Status(StatusCode.ERROR, event.error.splitlines()[0][:300]))
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
        spans.append(span)
        carriers.append(carrier)
    with _closing(spans):
        yield carriers


@contextmanager
def _closing(spans: Sequence[Span], record: bool = True) -> Iterator[None]:
    """End `spans` when the block ends; when it raises, mark each failed (and record the exception if `record`)."""
    try:
        yield
    except BaseException as exc:
        for span in spans:
            if record:
                span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        for span in spans:
            span.end()


@contextmanager
def consuming(
    topic: str, group: str, scheme: str, events: Sequence[Event], carriers: Sequence[Mapping[str, Any] | None]
) -> Iterator[None]:
    """Around a handler call: a `batch` span linked to every message's context, and a `process` span per
    message as the child of its header's context; what the handler publishes continues its text's span."""
    parents = [_PROPAGATOR.extract(c) if c else Context() for c in carriers]
    origins = [trace.get_current_span(p).get_span_context() for p in parents]
    common: dict[str, Any] = {
        "messaging.system": scheme,
        "messaging.destination.name": topic,
        "messaging.consumer.group.name": group,
        "messaging.operation.type": "process",
        "messaging.batch.message_count": len(events),
    }
    batch = _tracer.start_span(
        f"{group} batch {topic}",
        context=Context(),
        kind=SpanKind.CONSUMER,
        links=[Link(o) for o in origins if o.is_valid and o.trace_flags.sampled],
        attributes=common,
    )
    back = [Link(batch.get_span_context())] if batch.is_recording() else []
    spans: list[Span] = [batch]
    texts: dict[str, Context] = {}
    for event, parent in zip(events, parents, strict=True):
        span = _child(f"{group} process {topic}", parent, SpanKind.CONSUMER, back)
        if span.is_recording():
            span.set_attributes({**common, "messaging.message.id": event.message_id})
            if (text_id := _text_id(event)) is not None:
                span.set_attribute("flockwatch.text_id", text_id)
        spans.append(span)
        texts[event.key] = ctx = trace.set_span_in_context(span)
        _remember(event.key, ctx)
    token = _CURRENT.set(texts)
    attached = otel_context.attach(trace.set_span_in_context(batch))
    with _closing(spans):
        try:
            yield
        finally:
            otel_context.detach(attached)
            _CURRENT.reset(token)


@contextmanager
def text_spans(name: str, events: Sequence[Event]) -> Iterator[None]:
    """A span per text where a trace starts (the gateway), child of the active context (a client's
    `traceparent`, when the HTTP middleware found one); publishes inside continue each text's span."""
    if not ENABLED:
        yield
        return
    parent = otel_context.get_current()
    spans: list[Span] = []
    texts: dict[str, Context] = {}
    for event in events:
        span = _child(name, parent, SpanKind.SERVER)
        span.set_attribute("flockwatch.text_id", event.key)
        spans.append(span)
        texts[event.key] = ctx = trace.set_span_in_context(span)
        _remember(event.key, ctx)
    token = _CURRENT.set({**(_CURRENT.get() or {}), **texts})
    with _closing(spans, record=False):
        try:
            yield
        finally:
            _CURRENT.reset(token)


def extract(headers: Mapping[str, str]) -> Context | None:
    """The remote context in HTTP or message headers (`traceparent`), or None."""
    if "traceparent" not in headers:
        return None
    return _PROPAGATOR.extract(headers)
