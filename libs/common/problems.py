"""Refusals the HTTP APIs share: every 4xx is `{"detail": "<what was wrong>"}`, one string, and is documented."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException


class Problem(BaseModel):
    """An error: what was wrong, in words."""

    detail: str = Field(description="What was wrong: the field and the reason, or the limit that was hit.")


# The app's own validation handler answers 422 with a `Problem`; FastAPI would document its list-shaped default.
INVALID: dict[int | str, dict[str, object]] = {
    422: {"model": Problem, "description": "The request is not valid: the fields and what is wrong with each"},
}


def explain_unreadable_bodies(app: FastAPI) -> None:
    """Answer a body FastAPI cannot even decode (not UTF-8) like any other invalid body: 422 saying why.

    FastAPI's own answer is an undocumented 400 "There was an error parsing the body"."""

    async def unreadable_body(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
            detail = f"body: not UTF-8 text (byte {cause.start} is {cause.object[cause.start]:#04x}); send UTF-8 JSON"
            return JSONResponse({"detail": detail}, status_code=422)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, unreadable_body)
