"""Who may call the HTTP APIs: bearer tokens with scopes, a rate limit per token, body size and CORS limits.

Every service's `create_app` calls `harden(app, settings, max_body_bytes)` once and marks each route with the
scope it needs: `@app.post("/predict", dependencies=[Depends(require("predict"))])`. Routes without a
`require` (/health, /metrics) stay open.

Auth is on whenever `FLOCKWATCH_AUTH_TOKENS_FILE` is set. Without it every route is open and a loud warning
is logged (the embedded demo and local development); `FLOCKWATCH_AUTH_REQUIRED=true` (docker-compose) makes
a missing token file a start-up error instead.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from flockwatch.common import telemetry
from flockwatch.common.bodylimit import BodyLimit
from flockwatch.common.problems import Problem
from flockwatch.common.ratelimit import RateLimiter, retry_after
from flockwatch.common.settings import CommonSettings
from flockwatch.common.tokens import Scope, TokenEntry, TokenError, TokenStore

log = logging.getLogger(__name__)
REALM = "flockwatch"
BEARER = HTTPBearer(auto_error=False, description="An API token from `flockwatch token create`.")
# what `harden` answers besides the routes: on every route, and on every route that needs a token
TOO_LARGE: dict[int | str, dict[str, Any]] = {413: {"model": Problem, "description": "The body is too large"}}
REFUSED: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No bearer token, or an unknown or revoked one (when auth is on)"},
    403: {"model": Problem, "description": "The token lacks the scope this route needs"},
    429: {"model": Problem, "description": "The token is over its rate limit; retry after the Retry-After seconds"},
}
_CHECKS: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()  # the dependencies `require` made


class Guard:
    """An API's token store and rate limiter (both absent when auth is off)."""

    def __init__(self, settings: CommonSettings, api: str) -> None:
        self.api = api
        self.tokens: TokenStore | None = None
        self.limiter: RateLimiter | None = None
        path = settings.auth_tokens_file
        if path is None:
            if settings.auth_required:
                raise TokenError(
                    f"{api}: FLOCKWATCH_AUTH_REQUIRED is set but FLOCKWATCH_AUTH_TOKENS_FILE is not; "
                    "create one with `flockwatch token create --file FILE --name NAME --scope SCOPE`"
                )
            log.warning(
                "AUTH IS OFF: %s accepts every request without a token (no FLOCKWATCH_AUTH_TOKENS_FILE). "
                "Fine on a laptop; never expose this port.",
                api,
            )
            return
        self.tokens = TokenStore(path)
        if not len(self.tokens):
            log.warning("auth: %s lists no tokens; %s refuses every request until one is added", path, api)
        self.limiter = RateLimiter(settings.rate_limit_url or settings.shared_state_url, settings.rate_limit)
        log.info(
            "auth: %s checks %d token(s) from %s; rate limit %s per token (%s)",
            api,
            len(self.tokens),
            path,
            settings.rate_limit or "off",
            self.limiter.where,
        )

    async def check(self, credentials: HTTPAuthorizationCredentials | None, scope: Scope) -> TokenEntry | None:
        """The caller's token entry if it may use `scope` now (None: auth is off); else the HTTP error."""
        if self.tokens is None:
            return None
        if credentials is None:
            raise _refuse(
                401,
                f"{self.api} needs a bearer token with scope {scope!r} (header `Authorization: Bearer <token>`)",
                f'Bearer realm="{REALM}", scope="{scope}"',
            )
        entry = self.tokens.find(credentials.credentials)
        if entry is None:
            raise _refuse(
                401,
                "the bearer token is not valid (unknown or revoked)",
                f'Bearer realm="{REALM}", error="invalid_token", error_description="unknown or revoked token"',
            )
        if not entry.grants(scope):
            raise _refuse(
                403,
                f"token {entry.name!r} lacks scope {scope!r} (it has: {', '.join(sorted(entry.scopes))})",
                f'Bearer realm="{REALM}", error="insufficient_scope", scope="{scope}"',
            )
        if self.limiter is not None:
            wait = await self.limiter.hit(entry.name, entry.rate_limit)
            if wait is not None:
                rate = entry.rate_limit or self.limiter.default
                raise HTTPException(
                    429,
                    f"token {entry.name!r} is over its rate limit ({rate}); retry after the Retry-After seconds",
                    headers={"Retry-After": retry_after(wait)},
                )
        return entry

    async def aclose(self) -> None:
        """Close the rate limiter's Redis connections."""
        if self.limiter is not None:
            await self.limiter.aclose()


def _refuse(status: int, detail: str, challenge: str) -> HTTPException:
    telemetry.AUTH_REFUSED.labels(str(status)).inc()
    return HTTPException(status, detail, headers={"WWW-Authenticate": challenge})


def require(scope: Scope) -> Callable[..., Awaitable[TokenEntry | None]]:
    """A FastAPI dependency: the request must carry a token granting `scope` and be within its rate limit."""

    async def check(
        request: Request,
        # a default, not Annotated: the scope is a closure variable, which a string annotation cannot see
        credentials: HTTPAuthorizationCredentials | None = Security(BEARER, scopes=[scope]),  # noqa: B008
    ) -> TokenEntry | None:
        guard: Guard = request.app.state.guard
        return await guard.check(credentials, scope)

    _CHECKS.add(check)
    return check


def _needs_token(dependant: Dependant) -> bool:
    return any(d.call in _CHECKS or _needs_token(d) for d in dependant.dependencies)


def _document_refusals(app: FastAPI) -> None:
    """Have `app`'s OpenAPI document list what `harden` may answer (a route's own description of a status wins)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for route in app.routes:
                if isinstance(route, APIRoute):
                    refusals = {**TOO_LARGE, **(REFUSED if _needs_token(route.dependant) else {})}
                    route.responses = {**refusals, **route.responses}
        return build()

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the document


def harden(app: FastAPI, settings: CommonSettings, max_body_bytes: int) -> Guard:
    """Give `app` its guard (tokens, rate limits), a body size limit (413) and CORS only where configured, and
    document their refusals (401, 403, 429 on the routes that `require` a scope; 413 on all)."""
    guard = app.state.guard = Guard(settings, app.title)
    _document_refusals(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if settings.cors_origins:  # otherwise no CORS headers at all: browsers refuse cross-origin calls
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    return guard
