"""Every refusal of the three APIs is an RFC 9457 problem (`application/problem+json` with type, title, status and
detail), and their OpenAPI documents say so for every error response."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from flockwatch.common.problems import PROBLEM_JSON
from flockwatch.feedback.api import create_app as feedback_app

from tests.integration.feedback_support import fresh_schema, running_service
from tests.security.support import trainer_api
from tests.stack import stack


def assert_problem(answer: httpx.Response, status: int, words: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == PROBLEM_JSON
    body = answer.json()
    assert set(body) == {"type", "title", "status", "detail"} and body["type"] == "about:blank"
    assert body["status"] == status and body["title"] and words in body["detail"]


def assert_documented(schema: dict[str, Any]) -> None:
    errors = [
        (path, method, code, response)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        for code, response in operation["responses"].items()
        if code.startswith(("4", "5"))
    ]
    assert errors
    for path, method, code, response in errors:
        content = response.get("content", {})
        assert list(content) == [PROBLEM_JSON], (path, method, code, content)
        assert content[PROBLEM_JSON]["schema"] == {"$ref": "#/components/schemas/Problem"}
    problem = schema["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"title", "status", "detail"}


async def test_the_gateway_refuses_with_problems(sms_bundle: Path) -> None:
    async with stack(sms_bundle) as (client, _):
        assert_problem(await client.post("/predict", json={"text": ""}), 422, "text")
        assert_problem(
            await client.post("/predict", content=b"\xff\xfe", headers={"content-type": "application/json"}),
            422,
            "JSON",
        )
        assert_problem(await client.get("/decisions/never-seen"), 404, "never-seen")
        assert_problem(await client.put("/predict"), 405, "Method Not Allowed")
        assert_problem(await client.post("/predict", content=b"x" * 2_000_000), 413, "larger than")
        assert_documented((await client.get("/openapi.json")).json())


async def test_the_feedback_api_refuses_with_problems() -> None:
    async with fresh_schema() as schema, running_service(schema) as service:
        app = feedback_app(service)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:
            assert_problem(await client.post("/feedback", json={"text_id": "x"}), 422, "reviewer_id")
            assert_problem(await client.get("/feedback/nothing-here"), 404, "nothing-here")
            assert_documented((await client.get("/openapi.json")).json())
        await app.state.guard.aclose()


async def test_the_trainer_api_refuses_with_problems(tmp_path: Path) -> None:
    async with trainer_api(tmp_path) as (_, client):
        assert_problem(await client.get("/training/no-such-run"), 404, "no-such-run")
        assert_problem(await client.post("/training", json={"kind": "sideways"}), 422, "kind")
        assert_documented((await client.get("/openapi.json")).json())
