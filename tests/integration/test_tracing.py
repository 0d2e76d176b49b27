"""Trace context across the bus: one text's spans (gateway → voters → arbiter → decision, cascade rounds) share
one trace id, on the in-process bus and over real Redis Streams; with tracing off the bus adds nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from flockwatch.arbiter.app import ArbiterService
from flockwatch.arbiter.settings import ArbiterSettings
from flockwatch.common import topics, tracing
from flockwatch.common.bus import Bus, create_bus
from flockwatch.common.events import Decision, Event, TextSubmitted, Vote, VoteRequested
from flockwatch.common.kafka_dev import TansuBroker
from flockwatch.common.settings import CommonSettings
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from tests.integration.kafka_echo_worker import echo
from tests.integration.test_arbiter_cascade import CHEAP, cascade_bundle, one_tier_data  # noqa: F401 - fixture
from tests.stack import stack
from tests.unit.test_arbiter_policy import CLASSES, vote

REDIS = "redis://127.0.0.1:6379/4"
SPAM = "WINNER!! You have won a £1000 cash prize. Call 09061701461 now to claim, T&C apply"
HAM = "are we still on for lunch today? I'll be at the usual place by one"
# every span one text gets on its way through the embedded stack (the SMS bundle's voters)
PATH = {
    "gateway /predict",
    "send flockwatch.texts",
    "regex_voter process flockwatch.texts",
    "classical_voter process flockwatch.texts",
    "ws_voter process flockwatch.texts",
    "arbiter process flockwatch.texts",
    "send flockwatch.votes",
    "arbiter process flockwatch.votes",
    "send flockwatch.decisions",
    "gateway process flockwatch.decisions",
}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, every finished span kept in memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing.disable()


def of_text(exporter: InMemorySpanExporter, text_id: str) -> list[ReadableSpan]:
    """The finished spans about one text."""
    return [s for s in exporter.get_finished_spans() if (s.attributes or {}).get("flockwatch.text_id") == text_id]


def child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


async def settle(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


def assert_one_trace_in_order(text_spans: list[ReadableSpan]) -> None:
    """All spans in one trace, rooted at the gateway, each hop the child of the message that caused it."""
    assert len({s.context.trace_id for s in text_spans}) == 1, sorted({s.name for s in text_spans})
    by_id = {s.context.span_id: s for s in text_spans}
    (root,) = [s for s in text_spans if s.parent is None]
    assert root.name == "gateway /predict"

    def parent(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None and span.parent.span_id in by_id, span.name
        return by_id[span.parent.span_id]

    for span in text_spans:
        if span.name.endswith("process flockwatch.texts"):
            assert parent(span).name == "send flockwatch.texts" and parent(parent(span)) is root
        elif span.name == "send flockwatch.votes":
            assert parent(span).name.endswith("_voter process flockwatch.texts")
        elif span.name == "arbiter process flockwatch.votes":
            assert parent(span).name == "send flockwatch.votes"
        elif span.name == "send flockwatch.decisions":
            assert parent(span).name == "arbiter process flockwatch.votes"
        elif span.name == "gateway process flockwatch.decisions":
            assert parent(span).name == "send flockwatch.decisions"


async def predict_two(client: object, exporter: InMemorySpanExporter) -> dict[str, dict[str, object]]:
    """Two texts at once (they share handler batches); their answers, once every hop's span has ended."""
    replies = await asyncio.gather(
        client.post("/predict", json={"text": SPAM, "text_id": "trace-spam"}),  # type: ignore[attr-defined]
        client.post("/predict", json={"text": HAM, "text_id": "trace-ham"}),  # type: ignore[attr-defined]
    )
    assert [r.status_code for r in replies] == [200, 200]
    await settle(lambda: all({s.name for s in of_text(exporter, t)} >= PATH for t in ("trace-spam", "trace-ham")))
    return {r.json()["text_id"]: r.json() for r in replies}


async def test_one_texts_spans_share_one_trace_from_the_gateway_through_voters_and_arbiter(
    sms_bundle: Path, spans: InMemorySpanExporter
) -> None:
    async with stack(sms_bundle) as (client, _):
        answers = await predict_two(client, spans)
    spam, ham = of_text(spans, "trace-spam"), of_text(spans, "trace-ham")
    assert {s.name for s in spam} >= PATH and {s.name for s in ham} >= PATH
    assert_one_trace_in_order(spam)
    assert_one_trace_in_order(ham)
    assert spam[0].context.trace_id != ham[0].context.trace_id
    decision = next(s for s in spam if s.name == "send flockwatch.decisions").attributes or {}
    assert decision["flockwatch.prediction"] == answers["trace-spam"]["prediction"] == "spam"
    assert decision["flockwatch.path"] == answers["trace-spam"]["path"]
    # the batch spans link to every message they handled
    sent = {s.context.span_id for s in spam if s.name == "send flockwatch.votes"}
    linked = {
        link.context.span_id
        for s in spans.get_finished_spans()
        if s.name == "arbiter batch flockwatch.votes"
        for link in s.links
    }
    assert sent <= linked


async def test_trace_context_crosses_real_redis_streams_in_message_headers(
    sms_bundle: Path, spans: InMemorySpanExporter
) -> None:
    client = redis.Redis.from_url(REDIS)
    client.flushdb()
    try:
        async with stack(sms_bundle, bus_url=REDIS) as (http, _):
            await predict_two(http, spans)
    finally:
        client.flushdb()
    for text_id in ("trace-spam", "trace-ham"):
        text_spans = of_text(spans, text_id)
        assert {s.name for s in text_spans} >= PATH
        assert {(s.attributes or {}).get("messaging.system") for s in text_spans if "process" in s.name} == {"redis"}
        assert_one_trace_in_order(text_spans)


async def test_a_clients_traceparent_becomes_the_gateway_spans_parent(
    sms_bundle: Path, spans: InMemorySpanExporter
) -> None:
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with stack(sms_bundle) as (client, _):
        reply = await client.post(
            "/predict",
            json={"text": SPAM, "text_id": "trace-client"},
            headers={"traceparent": f"00-{trace_id}-{span_id}-01"},
        )
        assert reply.status_code == 200
        await settle(lambda: {s.name for s in of_text(spans, "trace-client")} >= PATH)
    text_spans = of_text(spans, "trace-client")
    assert {format(s.context.trace_id, "032x") for s in text_spans} == {trace_id}
    gateway = next(s for s in text_spans if s.name == "gateway /predict")
    assert gateway.parent is not None and format(gateway.parent.span_id, "016x") == span_id


async def test_cascade_rounds_stay_in_the_texts_trace(cascade_bundle: Path, spans: InMemorySpanExporter) -> None:  # noqa: F811
    n = 40
    settings = ArbiterSettings(model_dir=cascade_bundle, bus_url="memory://", arbiter_deadline_ms=2000)
    bus: Bus = create_bus(settings)
    arbiter = ArbiterService(bus, settings)
    probs = one_tier_data(n, 23)[0]
    decisions: list[Decision] = []

    @bus.subscribe(topics.DECISION_MADE, Decision, group="test-decisions")
    async def keep(msgs: list[Decision]) -> list[Event]:
        decisions.extend(msgs)
        return []

    @bus.subscribe(topics.VOTE_REQUESTED, VoteRequested, group="test-llm")
    async def llm(msgs: list[VoteRequested]) -> list[Event]:
        return [
            vote("llm", dict(zip(CLASSES, probs["llm"][int(m.text_id[1:])].tolist(), strict=True)), text_id=m.text_id)
            for m in msgs
        ]

    texts = [TextSubmitted(message_id=f"m{i}", text_id=f"t{i}", text=f"text {i}") for i in range(n)]
    cheap = [
        vote(name, None if np.isnan(p).any() else dict(zip(CLASSES, p.tolist(), strict=True)), text_id=f"t{i}")
        for i in range(n)
        for name in CHEAP
        if (p := probs[name][i]) is not None
    ]
    await arbiter.start()
    async with bus:
        with tracing.text_spans("client", texts):  # the texts and their cheap votes continue each text's span
            await bus.publish(texts)
            await bus.publish(cheap)
        await settle(lambda: len(decisions) == n)
    await arbiter.stop()
    escalated = [d.text_id for d in decisions if d.rounds and len(d.rounds) > 1]
    assert len(decisions) == n and escalated
    for text_id in escalated:
        text_spans = of_text(spans, text_id)
        names = {s.name for s in text_spans}
        assert {"send flockwatch.vote_requests", "test-llm process flockwatch.vote_requests"} <= names
        assert len({s.context.trace_id for s in text_spans}) == 1
        request = next(s for s in text_spans if s.name == "send flockwatch.vote_requests")
        answered = next(s for s in text_spans if s.name == "test-llm process flockwatch.vote_requests")
        assert answered.parent is not None and answered.parent.span_id == request.context.span_id
        (sent,) = [s for s in text_spans if s.name == "send flockwatch.decisions"]
        assert (sent.attributes or {})["flockwatch.cascade_rounds"] == 2


async def test_tracing_off_adds_no_headers_and_never_enters_the_tracing_code(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("tracing code ran while tracing is off")

    monkeypatch.setattr(tracing, "sending", forbidden)
    monkeypatch.setattr(tracing, "consuming", forbidden)
    bus = create_bus(CommonSettings(bus_url="memory://", _env_file=None))
    headers: list[object] = []
    dispatch = bus.dispatch

    async def spy(route: object, items: object, carried: object = None) -> None:
        headers.append(carried)
        await dispatch(route, items, carried)

    seen: list[str] = []

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group="echo")
    async def echo(msgs: list[TextSubmitted]) -> list[Event]:
        seen.extend(m.text_id for m in msgs)
        return []

    monkeypatch.setattr(bus, "dispatch", spy)
    async with bus:
        await bus.publish([TextSubmitted(message_id="m1", text_id="t1", text="hello")])
        await settle(lambda: seen == ["t1"])
    assert seen == ["t1"] and headers == [[None]]


async def test_each_message_of_a_kafka_batch_keeps_its_own_trace(
    spans: InMemorySpanExporter, tansu: TansuBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kafka record headers (a real Kafka-protocol broker); NATS carries them the same way through FastStream's
    # batch_headers, but its pulls can stall for the 30 s ack wait on a loaded box (tests/integration/test_bus.py)
    for name, value in tansu.env.items():
        monkeypatch.setenv(name, value)
    url = tansu.url
    run = f"tr{uuid.uuid4().hex[:8]}"
    bus = create_bus(CommonSettings(bus_url=url, instance_id=run, batch_wait_ms=5))
    votes: list[Vote] = []

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=f"{run}-echo")
    async def vote(msgs: list[TextSubmitted]) -> list[Event]:
        return echo([m for m in msgs if m.text_id.startswith(run)])

    @bus.subscribe(topics.VOTE_CAST, Vote, group=f"{run}-votes")
    async def keep(msgs: list[Vote]) -> list[Event]:
        votes.extend(v for v in msgs if v.text_id.startswith(run))
        return []

    texts = [TextSubmitted(message_id=f"{run}-{i}", text_id=f"{run}-{i}", text="hi") for i in range(20)]
    async with bus:
        await asyncio.sleep(0.3)
        with tracing.text_spans("client", texts):
            await bus.publish(texts)
        await settle(lambda: len(votes) >= len(texts), seconds=30)
        await settle(lambda: all(len(of_text(spans, t.text_id)) >= 5 for t in texts))
    assert len(votes) == len(texts)
    for text in texts:
        text_spans = of_text(spans, text.text_id)
        assert len({s.context.trace_id for s in text_spans}) == 1
        by_name = {s.name: s for s in text_spans}
        assert child_of(by_name[f"{run}-echo process flockwatch.texts"], by_name["send flockwatch.texts"])
        assert child_of(by_name[f"{run}-votes process flockwatch.votes"], by_name["send flockwatch.votes"])


async def test_an_unsampled_text_records_no_span_on_any_hop_but_carries_its_context() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))  # FLOCKWATCH_TRACING_SAMPLE_RATIO=0
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        bus = create_bus(CommonSettings(bus_url="memory://", _env_file=None))
        carried: list[object] = []
        dispatch = bus.dispatch

        async def spy(route: Any, items: Any, headers: Any = None) -> None:
            carried.extend(headers or [])
            await dispatch(route, items, headers)

        votes: list[Vote] = []

        @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group="echo")
        async def vote(msgs: list[TextSubmitted]) -> list[Event]:
            return echo(msgs)

        @bus.subscribe(topics.VOTE_CAST, Vote, group="keep")
        async def keep(msgs: list[Vote]) -> list[Event]:
            votes.extend(msgs)
            return []

        bus.dispatch = spy
        texts = [TextSubmitted(message_id=f"u{i}", text_id=f"u{i}", text="hi") for i in range(5)]
        async with bus:
            with tracing.text_spans("gateway /predict", texts):
                await bus.publish(texts)
            await settle(lambda: len(votes) == 5)
    finally:
        tracing.disable()
    assert len(votes) == 5 and exporter.get_finished_spans() == ()
    flags = [int(str(h["traceparent"]).rsplit("-", 1)[1], 16) for h in carried if isinstance(h, dict)]
    assert len(flags) == 10 and not any(f & 1 for f in flags)  # every hop got the context, marked not sampled
