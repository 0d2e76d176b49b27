"""Refusals the HTTP APIs share: every error is an RFC 9457 problem (`application/problem+json`) —
`{"type": "about:blank", "title": "Not Found", "status": 404, "detail": "<what was wrong>"}` — and is documented.

`detail` says, in one string, what was wrong (the field and the reason, or the limit that was hit); `title` is
the status's phrase; `type` is `about:blank` (no error has a page of its own). One module answers them all:
the route's own `HTTPException`s, the auth and rate-limit refusals, invalid and unreadable bodies, and the
raw ASGI refusals (body too large, load shed) through `problem_body`; `use_problem_json` also makes the OpenAPI
document say so for every error response.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

PROBLEM_JSON = "application/problem+json"


class Problem(BaseModel):
    """An error (RFC 9457): what was wrong, in words."""

    type: str = Field("about:blank", description="A URI naming the kind of problem; about:blank: see the status.")
    title: str = Field(description="The HTTP status's phrase.", examples=["Unprocessable Content"])
    status: int = Field(description="The HTTP status code.", examples=[422])
    detail: str = Field(
        description="What was wrong: the field and the reason, or the limit that was hit.",
        examples=["text: String should have at least 1 character"],
    )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem(status: int, detail: str) -> dict[str, Any]:
    """The problem document of a refusal."""
    return {"type": "about:blank", "title": _title(status), "status": status, "detail": detail}


def problem_body(status: int, detail: str) -> bytes:
    """The problem document as the bytes of a raw ASGI response (its content type: PROBLEM_JSON)."""
    return json.dumps(problem(status, detail)).encode()


def problem_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A refusal as an `application/problem+json` response."""
    return JSONResponse(problem(status, detail), status_code=status, headers=headers, media_type=PROBLEM_JSON)


def validation_detail(exc: RequestValidationError) -> str:
    """The fields of an invalid request and what is wrong with each, in one string (never the input itself:
    an input JSON cannot encode, a lone surrogate, would turn the 422 into a 500)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in exc.errors()
    )


def use_problem_json(app: FastAPI) -> None:
    """Answer every refusal of `app` as a problem, and document every error response as `application/problem+json`
    with the `Problem` schema (an invalid request is a 422 problem saying what is wrong; a body that is not UTF-8
    too, instead of FastAPI's undocumented 400; a 405 lists in `Allow` every method the path serves)."""

    async def refusal(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
            detail = f"body: not UTF-8 text (byte {cause.start} is {cause.object[cause.start]:#04x}); send UTF-8 JSON"
            return problem_response(422, detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed(app, request)
        return problem_response(exc.status_code, str(exc.detail), headers or None)

    async def invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return problem_response(422, validation_detail(exc))

    app.add_exception_handler(StarletteHTTPException, refusal)
    app.add_exception_handler(RequestValidationError, invalid_request)
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _as_problems(build())
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def _as_problems(schema: dict[str, Any]) -> None:
    """Every non-2xx response of the document: `application/problem+json`, the `Problem` schema."""
    ref = {"$ref": "#/components/schemas/Problem"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                if not str(code).startswith(("4", "5")):
                    continue
                response["content"] = {PROBLEM_JSON: {"schema": ref}}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for unused in ("HTTPValidationError", "ValidationError"):
        if not _referenced(schema, f"#/components/schemas/{unused}"):
            components.pop(unused, None)


def _referenced(schema: dict[str, Any], ref: str) -> bool:
    return ref in json.dumps(schema.get("paths", {}))


# The app's own validation handler answers 422 with a `Problem`; FastAPI would document its list-shaped default.
INVALID: dict[int | str, dict[str, object]] = {
    422: {"model": Problem, "description": "The request is not valid: the fields and what is wrong with each"},
}


def _allowed(app: FastAPI, request: Request) -> str:
    """Every method some route of `app` serves at the request's path (Starlette's 405 names one route's)."""
    methods: set[str] = set()
    for route in app.routes:
        match, _ = route.matches({**request.scope, "method": "\0"})  # a method no route has: path only
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))
