"""Refusals the HTTP APIs share: every 4xx is `{"detail": "<what was wrong>"}`, one string, and is documented."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match


class Problem(BaseModel):
    """An error: what was wrong, in words."""

    detail: str = Field(description="What was wrong: the field and the reason, or the limit that was hit.")


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


def explain_unreadable_bodies(app: FastAPI) -> None:
    """Answer a body FastAPI cannot even decode (not UTF-8) like any other invalid body: 422 saying why; and
    list in a 405's `Allow` every method the path serves.

    FastAPI's own answer is an undocumented 400 "There was an error parsing the body"; Starlette's 405 lists
    the methods of only the first route at the path (`GET /training` hides `POST /training`)."""

    async def unreadable_body(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
            detail = f"body: not UTF-8 text (byte {cause.start} is {cause.object[cause.start]:#04x}); send UTF-8 JSON"
            return JSONResponse({"detail": detail}, status_code=422)
        if exc.status_code == 405:
            exc.headers = {**(exc.headers or {}), "Allow": _allowed(app, request)}
        return await http_exception_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, unreadable_body)


def explain_invalid_requests(app: FastAPI) -> None:
    """Answer a request that fails validation with a 422 `Problem`: the fields and what is wrong with each, in
    one string. FastAPI's own answer echoes the input back, so an input JSON cannot encode (a lone surrogate)
    turned the 422 into a 500."""

    async def invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in exc.errors()
        )
        return JSONResponse({"detail": problems}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid_request)
