"""Issue 19, no 500 from input: NUL (Postgres stores none) and lone surrogates in the feedback service's body
fields, path and query are refused with a 422 that says which field and why."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from flockwatch.feedback.api import create_app

from tests.integration.feedback_support import fresh_schema, running_service

FIELDS = ("feedback_id", "text_id", "label", "note", "reviewer_id")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with fresh_schema() as schema, running_service(schema) as service:
        app = create_app(service)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:
            yield client
        await app.state.guard.aclose()


@pytest.mark.parametrize("field", FIELDS)
# a lone surrogate in a required field is refused by pydantic's own str check, in an optional one by ours
@pytest.mark.parametrize(
    ("value", "why"), [(r"sp\u0000am", ("NUL character",)), (r"sp\ud800am", ("lone surrogate", "unicode string"))]
)
async def test_nul_or_a_lone_surrogate_in_a_feedback_field_is_a_422(
    client: httpx.AsyncClient, field: str, value: str, why: tuple[str, ...]
) -> None:
    fields = {"feedback_id": "f1", "text_id": "t1", "label": "spam", "note": "n", "reviewer_id": "r1"}
    body = ", ".join(f'"{k}": "{value if k == field else v}"' for k, v in fields.items())
    answer = await client.post("/feedback", content="{" + body + "}", headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith(f"{field}: ")
    assert any(reason in answer.json()["detail"] for reason in why), answer.text


async def test_nul_in_a_path_or_query_is_a_422(client: httpx.AsyncClient) -> None:
    by_id = await client.get("/feedback/%00")
    queue = await client.get("/review/queue", params={"reviewer": "r\x00"})
    fine = await client.get("/feedback/no-such-id")
    assert by_id.status_code == 422 and "NUL character" in by_id.json()["detail"]
    assert queue.status_code == 422 and "NUL character" in queue.json()["detail"]
    assert fine.status_code == 404
