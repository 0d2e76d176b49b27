"""The feedback API's response contract: every route answers exactly what the store and review code it calls
return (a response model that forgot a field would drop it silently; a wrong type would answer 500), and the
OpenAPI document types every success response (no bare `additionalProperties: true` object)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from flockwatch.feedback.app import FeedbackService
from flockwatch.feedback.review import conflicts, feedback_groups, review_queue, reviewers, rules_report
from pydantic_core import to_jsonable_python

from tests.feedback_events import decision, feedback, text, vote
from tests.integration.feedback_support import api_client, count, eventually, fresh_schema, running_service
from tests.integration.test_feedback_service import HAM, SPAM, SPAM_P, publish, seed

# the routes whose answers this test compares (everything the document lists but POST /feedback)
ROUTES = {
    ("get", "/feedback/conflicts"),
    ("get", "/feedback/duplicates"),
    ("get", "/feedback/reviewers"),
    ("get", "/feedback/hygiene"),
    ("post", "/feedback/hygiene"),
    ("get", "/feedback/{feedback_id}"),
    ("get", "/review/queue"),
    ("get", "/labels"),
    ("get", "/rules/stats"),
    ("get", "/health"),
}


@pytest.fixture
async def service() -> AsyncIterator[FeedbackService]:
    async with fresh_schema() as schema, running_service(schema) as svc:
        yield svc


@pytest.fixture
async def client(service: FeedbackService) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(service) as c:
        yield c


def as_json(value: Any) -> Any:
    """`value` as the API serialized it before its responses were typed (pydantic's JSON mode: a UTC time with Z)."""
    return to_jsonable_python(value)


async def _rows(service: FeedbackService, table: str, n: int) -> bool:
    return await count(service, table) == n


async def fill(service: FeedbackService, client: httpx.AsyncClient) -> dict[str, Any]:
    """Decided texts (voters, rule firings), enough corrections for the label check (one planted wrong) and one
    label-check run; then a conflict, duplicate texts, a repeated correction, a thumbs up, and a thumbs down on a
    text the service never saw. `split` stays unreviewed: the model's part of the queue."""
    await seed(service)  # calm, split (voters disagree), unsure (abstained)
    await publish(service, text("d1", "Call me at 07700 900123"), text("d2", "call me at  +44 7700 900999"))
    rows = [(f"s{i}-{j}", f"{t} {i}", "spam") for i in range(8) for j, t in enumerate(SPAM)]
    rows += [(f"h{i}-{j}", f"{t} {i}", "ham") for i in range(8) for j, t in enumerate(HAM)]
    rows[0] = (rows[0][0], rows[0][1], "ham")  # a planted label error
    await publish(service, *(text(tid, body) for tid, body, _ in rows))
    await eventually(lambda: _rows(service, "texts", 5 + len(rows)))
    # the prize rule fires on a text labelled spam (right) and on one labelled ham (wrong)
    fired = [decision(tid, "spam", [vote(tid, "regex", SPAM_P, ("spam-prize-claim",))]) for tid in ("s1-0", "h1-0")]
    await publish(service, *fired)
    await eventually(lambda: _rows(service, "decisions", 5))
    await publish(service, *(feedback(f"fb-{tid}", tid, "ann", label) for tid, _, label in rows))
    await eventually(lambda: _rows(service, "feedback", len(rows)))
    ran = await client.post("/feedback/hygiene")  # before the conflicts: it would flag one side of them
    assert ran.status_code == 200, ran.text
    posts = [
        {"feedback_id": "c-ann", "text_id": "unsure", "label": "spam", "reviewer_id": "ann"},  # a conflict…
        {"feedback_id": "c-bob", "text_id": "unsure", "label": "ham", "reviewer_id": "bob"},  # …on one text
        {"feedback_id": "d-ann", "text_id": "d1", "label": "ham", "reviewer_id": "ann"},  # duplicate texts…
        {"feedback_id": "d-bob", "text_id": "d2", "label": "spam", "reviewer_id": "bob"},  # …labelled apart
        {"feedback_id": "d-bob-2", "text_id": "d2", "label": "spam", "reviewer_id": "bob"},  # repeated
        {"feedback_id": "up", "text_id": "calm", "thumbs": "up", "reviewer_id": "cat", "note": "right: a@b.co"},
        {"feedback_id": "down", "text_id": "ghost", "thumbs": "down", "reviewer_id": "cat"},  # an unknown text
    ]
    for body in posts:
        assert (await client.post("/feedback", json=body)).status_code == 202, body
    return dict(ran.json())


async def test_every_route_answers_what_the_service_computes(
    service: FeedbackService, client: httpx.AsyncClient
) -> None:
    store, task = service.store, service.task
    ran = await fill(service, client)

    async def get(path: str, **params: Any) -> Any:
        answer = await client.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    # POST /feedback/hygiene answered the run it stored; GET /feedback/hygiene answers the stored row
    last = await store.last_hygiene_run()
    assert last is not None and ran["issues"], "the check should have flagged the planted error"
    assert ran == {"run_id": last["run_id"], **last["details"], "flagged": last["n_flagged"]}
    assert await get("/feedback/hygiene") == as_json({"last_run": last})

    found = conflicts(await feedback_groups(store))
    assert found and any(c["status"] == "conflict" for c in found)
    expected = {"unresolved": sum(c["status"] == "conflict" for c in found), "conflicts": found}
    assert await get("/feedback/conflicts") == as_json(expected)

    expected = {
        "repeated_feedback": await store.repeated_feedback(100),
        "duplicate_texts": await store.duplicate_texts(100),
    }
    assert expected["repeated_feedback"] and expected["duplicate_texts"]
    assert await get("/feedback/duplicates") == as_json(expected)

    expected = {"reviewers": reviewers(await feedback_groups(store))}
    assert len(expected["reviewers"]) == 3
    assert await get("/feedback/reviewers") == as_json(expected)

    flagged = ran["issues"][0]["feedback_id"]
    for feedback_id in ("up", "down", "c-bob", flagged):  # a note, a thumbs down, a correction, a flagged one
        stored = await store.feedback(feedback_id)
        assert stored is not None
        assert await get(f"/feedback/{feedback_id}") == as_json(stored)
    assert (await store.feedback(flagged) or {})["flag_score"] is not None

    queue = await review_queue(store, task, 50)
    assert {i["source"] for i in queue["items"]} == {"feedback", "model"}, "both kinds of item"
    assert await get("/review/queue", limit=50) == as_json(queue)
    queue = await review_queue(store, task, 5, "bob")
    assert await get("/review/queue", limit=5, reviewer="bob") == as_json(queue)

    assert task.labels is not None
    expected = {"task": task.labels.task, "labels": [spec.model_dump() for spec in task.labels.labels]}
    assert await get("/labels") == as_json(expected)

    expected = {"rules": [s.as_dict() for s in await rules_report(store, task)]}
    assert any(r["labelled"] for r in expected["rules"])
    assert await get("/rules/stats") == as_json(expected)

    assert await get("/health") == {"status": "ok", "database": "ok", "bus": "memory"}


async def test_the_labels_of_a_task_without_labels_yaml(client: httpx.AsyncClient, service: FeedbackService) -> None:
    service.task = type(service.task)()  # no labels.yaml: any label accepted
    assert (await client.get("/labels")).json() == {"task": None, "labels": []}
    assert (await client.get("/feedback/hygiene")).json() == {"last_run": None}


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _untyped(document: dict[str, Any], schema: dict[str, Any], where: str, seen: set[str]) -> list[str]:
    """The places under `schema` that say nothing of their content: an empty schema, or an object with no
    properties whose values may be anything."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return []
        seen.add(name)
        return _untyped(document, _resolve(document, schema), f"{where}→{name}", seen)
    if not schema or set(schema) <= {"title", "description", "examples"}:
        return [f"{where}: empty schema"]
    found = []
    if schema.get("type") == "object" and not schema.get("properties"):
        values = schema.get("additionalProperties", True)
        if values is True or values == {}:
            found.append(f"{where}: object of anything")
        elif isinstance(values, dict):
            found += _untyped(document, values, f"{where}[*]", seen)
    for name, sub in schema.get("properties", {}).items():
        found += _untyped(document, sub, f"{where}.{name}", seen)
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            found += _untyped(document, sub, f"{where}|{i}", seen)
    if "items" in schema:
        found += _untyped(document, schema["items"], f"{where}[]", seen)
    return found


async def test_every_success_response_is_typed(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    operations = {(m, p): op for p, ops in document["paths"].items() for m, op in ops.items()}
    assert ROUTES | {("post", "/feedback")} == set(operations)
    for (method, path), operation in operations.items():
        ok = {code: r for code, r in operation["responses"].items() if code.startswith("2")}
        assert ok, (method, path)
        for code, response in ok.items():
            schema = response["content"]["application/json"]["schema"]
            assert "properties" in _resolve(document, schema), (method, path, code, schema)
            assert _untyped(document, schema, f"{method} {path} {code}", set()) == [], (method, path)


async def test_the_documented_refusals_are_the_ones_a_route_can_answer(client: httpx.AsyncClient) -> None:
    """404 only where a route looks something up; 422 only where it takes input (a body, a path or a query
    parameter); 409 and 503 only on POST /feedback; 401, 403, 429 wherever a token is needed; 413 on all."""
    document = (await client.get("/openapi.json")).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            errors = {code for code in operation["responses"] if not code.startswith("2")}
            takes_input = bool(operation.get("parameters") or operation.get("requestBody"))
            expected = {"413"} | ({"401", "403", "429"} if operation.get("security") else set())
            expected |= {"422"} if takes_input else set()
            expected |= {"404"} if path == "/feedback/{feedback_id}" else set()
            expected |= {"409", "503"} if (method, path) == ("post", "/feedback") else set()
            assert errors == expected, (method, path)
