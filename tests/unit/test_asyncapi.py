"""The AsyncAPI document: generated from the routes, committed as docs/asyncapi.json, kept up to date."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
from flockwatch.cli.asyncapi_cmd import asyncapi
from flockwatch.common import topics
from flockwatch.common.asyncapi import published_types, render, services_asyncapi
from flockwatch.common.events import Decision, Event, TextSubmitted, Vote
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.json"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return services_asyncapi()


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("asyncapi")(asyncapi)
    return app


def _addresses(doc: dict[str, Any], action: str) -> set[str]:
    return {
        doc["channels"][op["channel"]["$ref"].rsplit("/", 1)[1]]["address"]
        for op in doc["operations"].values()
        if op["action"] == action
    }


def test_committed_document_is_the_generated_one(doc: dict[str, Any]) -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render(doc), (
        "docs/asyncapi.json is out of date: run `flockwatch asyncapi` and commit it"
    )


def test_every_topic_the_services_use_has_a_channel(doc: dict[str, Any]) -> None:
    used = {topics.TEXT_SUBMITTED, topics.VOTE_CAST, topics.DECISION_MADE, topics.MODEL_PUBLISHED, topics.DEAD_LETTER}
    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert used <= addresses <= set(topics.ALL)


def test_the_pipeline_topics_are_both_sent_and_received(doc: dict[str, Any]) -> None:
    pipeline = {topics.TEXT_SUBMITTED, topics.VOTE_CAST, topics.DECISION_MADE}
    assert pipeline <= _addresses(doc, "send")
    assert pipeline | {topics.MODEL_PUBLISHED} <= _addresses(doc, "receive")


def test_messages_carry_the_event_payload_schemas(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert "probabilities" in schemas["Vote"]["properties"]
    assert {"text_id", "text"} <= set(schemas["TextSubmitted"]["required"])
    assert "votes" in schemas["Decision"]["properties"]
    payload = doc["components"]["messages"]["flockwatch.votes:arbiter:SubscribeMessage"]["payload"]
    assert payload == {"$ref": "#/components/schemas/Vote"}


def test_every_message_documents_the_signature_header(doc: dict[str, Any]) -> None:
    from flockwatch.common.signing import HEADER, sign

    headers = doc["components"]["schemas"]["MessageHeaders"]["properties"]
    assert HEADER in headers
    assert re.fullmatch(headers[HEADER]["pattern"], sign(b"k", "flockwatch.texts", b"{}"))
    assert all(
        m["headers"] == {"$ref": "#/components/schemas/MessageHeaders"} for m in doc["components"]["messages"].values()
    )


def test_receive_operations_name_their_consumer_group(doc: dict[str, Any]) -> None:
    groups = doc["operations"]["flockwatch.texts:regex_voter"]["bindings"]["kafka"]["groupId"]
    assert groups["enum"] == ["regex_voter"]


def test_return_annotation_names_what_a_handler_publishes() -> None:
    async def votes(msgs: list[TextSubmitted]) -> list[Vote]:
        return []

    async def either(msgs: list[Vote]) -> list[Vote | Decision]:
        return []

    async def anything(msgs: list[Vote]) -> list[Event]:
        return []

    assert published_types(votes) == [Vote]
    assert published_types(either) == [Vote, Decision]
    assert published_types(anything) == []


def test_check_fails_with_a_clear_message_when_stale(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"
    out.write_text("{}\n")
    result = CliRunner().invoke(_cli(), ["--out", str(out), "--check"])
    assert result.exit_code == 1
    assert "differs" in result.output and "flockwatch asyncapi" in result.output


def test_check_passes_after_writing(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "asyncapi.json"
    assert CliRunner().invoke(_cli(), ["--out", str(out)]).exit_code == 0
    result = CliRunner().invoke(_cli(), ["--out", str(out), "--check"])
    assert result.exit_code == 0, result.output
