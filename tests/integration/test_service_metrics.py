"""Prometheus metrics appear once texts flow: the gateway's /metrics, the trainer's, and the metrics port of the
bus-only services. Counters are process-wide, so each test compares before and after."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import httpx
from flockwatch.common import telemetry, topics
from flockwatch.common.metrics_http import serve_metrics
from flockwatch.common.settings import CommonSettings
from flockwatch.trainer.api import create_app as trainer_app
from flockwatch.trainer.app import TrainerService
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import stack

SPAM = "WINNER!! You have won a £1000 cash prize. Call 09061701461 now to claim, T&C apply"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def test_gateway_metrics_count_the_messages_votes_decisions_and_requests_of_texts_that_flowed(
    sms_bundle: Path,
) -> None:
    async with stack(sms_bundle) as (client, bus):
        before = parse((await client.get("/metrics")).text)
        answers = await asyncio.gather(
            *(client.post("/predict", json={"text": SPAM, "text_id": f"metrics-{i}"}) for i in range(3))
        )
        assert {a.status_code for a in answers} == {200}
        await bus.publish_raw(topics.TEXT_SUBMITTED, b"{not json", "poison")
        await asyncio.sleep(0.2)  # the gateway's own decision consumer finishes after the answers
        after = parse((await client.get("/metrics")).text)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("flockwatch_messages_in_total", topic="flockwatch.texts", group="regex_voter") == 4  # + poison
    assert grew("flockwatch_messages_out_total", topic="flockwatch.decisions") == 3
    assert grew("flockwatch_votes_total", voter="tfidf_lr", outcome="vote", label="spam") == 3
    assert grew("flockwatch_votes_total", voter="regex") == 3  # a vote or an abstention each
    assert grew("flockwatch_decisions_total", outcome="answer", label="spam") == 3
    assert grew("flockwatch_decision_latency_seconds_count") == 3
    assert grew("flockwatch_handler_seconds_count", group="arbiter") >= 1
    assert grew("flockwatch_dead_letters_total", topic="flockwatch.texts", group="arbiter") == 1
    assert grew("flockwatch_http_requests_total", app="gateway", method="POST", route="/predict", status="200") == 3
    assert grew("flockwatch_http_request_seconds_count", app="gateway", route="/predict") == 3
    versions = {dict(ls)["component"] for (n, ls), v in after.items() if n == "flockwatch_model_info" and v == 1}
    assert {"regex_voter", "classical_voter", "ws_voter", "arbiter"} <= versions


def test_a_reloaded_model_replaces_its_version_series() -> None:
    telemetry.set_model_version("test_component", "v1")
    telemetry.set_model_version("test_component", "v2")
    shown = {
        dict(s.labels)["version"]
        for family in text_string_to_metric_families(generate_latest().decode())
        for s in family.samples
        if s.name == "flockwatch_model_info" and s.labels.get("component") == "test_component"
    }
    assert shown == {"v2"}


async def test_bus_only_services_serve_metrics_on_their_port_only_when_configured() -> None:
    assert serve_metrics(CommonSettings(bus_url="memory://", _env_file=None)) is None
    served = serve_metrics(CommonSettings(bus_url="memory://", metrics_port=0, _env_file=None))
    assert served is not None
    server, _ = served
    try:
        telemetry.VOTES.labels("port-test", "vote", "spam").inc()
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"http://127.0.0.1:{server.server_port}/metrics")
        assert total(parse(reply.text), "flockwatch_votes_total", voter="port-test", label="spam") >= 1
    finally:
        server.shutdown()
        server.server_close()


async def test_the_trainer_serves_metrics_without_a_token() -> None:
    service = cast(TrainerService, type("Started", (), {"settings": CommonSettings(_env_file=None)})())
    telemetry.TRAINING_RUNS.labels("published").inc()
    transport = httpx.ASGITransport(app=trainer_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://trainer") as client:
        reply = await client.get("/metrics")
        again = await client.get("/metrics")
    assert reply.status_code == 200
    assert total(parse(again.text), "flockwatch_training_runs_total", status="published") >= 1
    assert total(parse(again.text), "flockwatch_http_requests_total", app="trainer", route="/metrics") >= 1
