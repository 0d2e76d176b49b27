"""Bearer tokens with scopes, per-token rate limits (Redis and memory), body limits and CORS on the three HTTP APIs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from flockwatch.cli.main import app as cli
from flockwatch.common.auth import Guard
from flockwatch.common.bus import create_bus
from flockwatch.common.http import EmbeddedServer
from flockwatch.common.settings import CommonSettings
from flockwatch.common.tokens import SCOPES, Scope, TokenError, add_token, revoke_token
from flockwatch.feedback.api import create_app as feedback_app
from flockwatch.trainer.api import create_app as trainer_app
from flockwatch.trainer.app import TrainerService
from flockwatch.trainer.settings import TrainerSettings
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from tests.integration.feedback_support import fresh_schema, running_service
from tests.stack import stack

REDIS = "redis://127.0.0.1:6379/3"  # rate-limit windows (keys named after each test's own tokens, and expiring)
ROUTES = [("POST", "/predict"), ("POST", "/predict/batch"), ("POST", "/texts"), ("GET", "/decisions/t1")]
NOT_PREDICT: tuple[Scope, ...] = ("feedback", "review")
BODY = {"/predict": {"text": "hi"}, "/predict/batch": {"texts": [{"text": "hi"}]}, "/texts": {"text": "hi"}}


class Tokens(NamedTuple):
    path: Path
    token: dict[Scope, str]  # scope → a token holding just that scope
    name: dict[Scope, str]


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    """A token file with one token per scope (names unique per test: rate-limit windows are per name)."""
    path = tmp_path / "tokens.yaml"
    name: dict[Scope, str] = {s: f"{s}-{uuid.uuid4().hex[:8]}" for s in SCOPES}
    return Tokens(path, {s: add_token(path, name[s], [s]) for s in SCOPES}, name)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused(status: int) -> float:
    return REGISTRY.get_sample_value("flockwatch_http_auth_refused_total", {"status": str(status)}) or 0.0


async def call(client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> httpx.Response:
    return await client.request(method, path, json=BODY.get(path) if method == "POST" else None, **kw)


async def test_gateway_without_a_token_or_with_an_unknown_one_is_401_with_a_bearer_challenge(
    tmp_path: Path, tokens: Tokens
) -> None:
    refused_before = refused(401)
    async with stack(tmp_path, ["gateway"], auth_tokens_file=tokens.path) as (client, _):
        for method, path in ROUTES:
            missing = await call(client, method, path)
            assert missing.status_code == 401, path
            assert missing.headers["www-authenticate"].startswith('Bearer realm="flockwatch"')
            assert "needs a bearer token with scope 'predict'" in missing.json()["detail"]
            for header in (bearer("fw_not-a-token"), {"Authorization": f"Basic {tokens.token['predict']}"}):
                wrong = await call(client, method, path, headers=header)
                assert wrong.status_code == 401, (path, header)
        unknown = await call(client, "POST", "/predict", headers=bearer("fw_not-a-token"))
    assert 'error="invalid_token"' in unknown.headers["www-authenticate"]
    assert unknown.json()["detail"] == "the bearer token is not valid (unknown or revoked)"
    assert refused(401) - refused_before == 4 * 3 + 1


async def test_gateway_with_a_token_lacking_the_predict_scope_is_403(tmp_path: Path, tokens: Tokens) -> None:
    made = tokens.token
    async with stack(tmp_path, ["gateway"], auth_tokens_file=tokens.path) as (client, _):
        for method, route in ROUTES:
            for scope in NOT_PREDICT:
                refused = await call(client, method, route, headers=bearer(made[scope]))
                assert refused.status_code == 403, (route, scope)
                detail = f"token '{tokens.name[scope]}' lacks scope 'predict' (it has: {scope})"
                assert refused.json()["detail"] == detail
                assert 'error="insufficient_scope", scope="predict"' in refused.headers["www-authenticate"]
        # a predict token (and admin, which holds every scope) gets through to the route: 404 for an unknown id
        assert (await client.get("/decisions/nope", headers=bearer(made["predict"]))).status_code == 404
        assert (await client.get("/decisions/nope", headers=bearer(made["admin"]))).status_code == 404
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_a_revoked_token_is_refused_without_a_restart(tmp_path: Path, tokens: Tokens) -> None:
    made = tokens.token
    async with stack(tmp_path, ["gateway"], auth_tokens_file=tokens.path) as (client, _):
        assert (await client.get("/decisions/x", headers=bearer(made["predict"]))).status_code == 404
        revoke_token(tokens.path, tokens.name["predict"])
        await asyncio.sleep(1.1)  # the store re-reads a changed file at most once a second
        assert (await client.get("/decisions/x", headers=bearer(made["predict"]))).status_code == 401
        assert (await client.get("/decisions/x", headers=bearer(made["admin"]))).status_code == 404


async def test_over_the_rate_limit_is_429_with_the_seconds_until_the_window_frees(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    token = add_token(path, f"limited-{uuid.uuid4().hex[:8]}", ["predict"], rate_limit="2/2 seconds")
    settings: dict[str, Any] = {"auth_tokens_file": path, "rate_limit_url": REDIS}
    # two gateway instances on one Redis: the token's budget is shared
    async with (
        stack(tmp_path, ["gateway"], **settings) as (one, _),
        stack(tmp_path, ["gateway"], **settings) as (two, _),
    ):
        assert [(await c.get("/decisions/x", headers=bearer(token))).status_code for c in (one, two)] == [404, 404]
        over = await two.get("/decisions/x", headers=bearer(token))
        assert over.status_code == 429
        assert over.headers["retry-after"] == "2"  # the window's first request frees its slot in 2 s, rounded up
        assert "over its rate limit (2/2 seconds)" in over.json()["detail"]
        await asyncio.sleep(int(over.headers["retry-after"]))
        assert (await one.get("/decisions/x", headers=bearer(token))).status_code == 404


async def test_without_redis_the_rate_limit_is_counted_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    token = add_token(path, "local", ["predict"])
    async with stack(tmp_path, ["gateway"], auth_tokens_file=path, rate_limit="3/minute") as (client, _):
        codes = [(await client.get("/decisions/x", headers=bearer(token))).status_code for _ in range(4)]
        over = await client.get("/decisions/x", headers=bearer(token))
    assert codes == [404, 404, 404, 429]
    assert 58 <= int(over.headers["retry-after"]) <= 60


def test_auth_required_without_a_token_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="FLOCKWATCH_AUTH_TOKENS_FILE is not"):
        Guard(CommonSettings(_env_file=None, auth_required=True), "api")
    with pytest.raises(TokenError, match="cannot read the token file"):
        Guard(CommonSettings(_env_file=None, auth_tokens_file=tmp_path / "missing.yaml"), "api")


async def test_cors_is_closed_by_default_and_open_only_to_configured_origins(tmp_path: Path) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with stack(tmp_path, ["gateway"]) as (client, _):
        closed = await client.options("/predict", headers=preflight)
        plain = await client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in closed.headers and closed.status_code == 405
    assert "access-control-allow-origin" not in plain.headers
    async with stack(tmp_path, ["gateway"], cors_origins="https://ui.example, https://ops.example") as (client, _):
        allowed = await client.options("/predict", headers={**preflight, "Origin": "https://ops.example"})
        other = await client.options("/predict", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ops.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in other.headers


@pytest.fixture
async def feedback_client(tokens: Tokens) -> AsyncIterator[httpx.AsyncClient]:
    async with fresh_schema() as schema, running_service(schema, auth_tokens_file=tokens.path) as service:
        app = feedback_app(service)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:
            yield client
        await app.state.guard.aclose()


async def test_feedback_api_scopes(feedback_client: httpx.AsyncClient, tokens: Tokens) -> None:
    made = tokens.token
    body = {"text_id": "t1", "label": "spam", "reviewer_id": "r1"}
    assert (await feedback_client.post("/feedback", json=body)).status_code == 401
    assert (await feedback_client.post("/feedback", json=body, headers=bearer(made["predict"]))).status_code == 403
    posted = await feedback_client.post("/feedback", json=body, headers=bearer(made["feedback"]))
    assert posted.status_code == 202 and posted.json()["status"] == "stored"
    for route in ("/review/queue", "/feedback/conflicts", "/rules/stats", "/feedback/reviewers"):
        assert (await feedback_client.get(route, headers=bearer(made["feedback"]))).status_code == 403, route
        assert (await feedback_client.get(route, headers=bearer(made["review"]))).status_code == 200, route
    # reviewers label through POST /feedback (the review page does), so review includes feedback
    assert (await feedback_client.get("/labels", headers=bearer(made["review"]))).status_code == 200
    hygiene = await feedback_client.post("/feedback/hygiene", headers=bearer(made["review"]))
    assert hygiene.status_code == 403 and "lacks scope 'admin'" in hygiene.json()["detail"]
    for open_route in ("/health", "/metrics", "/review"):
        assert (await feedback_client.get(open_route)).status_code == 200, open_route


async def test_feedback_api_refuses_an_oversized_body_with_413(feedback_client: httpx.AsyncClient) -> None:
    big = b'{"text_id": "t1", "reviewer_id": "r", "note": "' + b"x" * 70_000 + b'"}'
    response = await feedback_client.post("/feedback", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "65536 bytes" in response.json()["detail"]


async def test_trainer_api_needs_the_admin_scope(tmp_path: Path, tokens: Tokens) -> None:
    made = tokens.token
    settings = TrainerSettings(_env_file=None, auth_tokens_file=tokens.path, trainer_models_root=tmp_path)
    app = trainer_app(TrainerService(create_bus(settings), settings))  # not started: refused before any handler
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://trainer") as client:
        assert (await client.post("/training", json={"kind": "full"})).status_code == 401
        for scope in ("predict", *NOT_PREDICT):
            refused = await client.post("/training", json={"kind": "full"}, headers=bearer(made[scope]))
            assert refused.status_code == 403 and "lacks scope 'admin'" in refused.json()["detail"]
        models = await client.get("/models", headers=bearer(made["admin"]))
        assert models.status_code == 200 and models.json() == {"versions": [], "history": []}
        assert (await client.get("/metrics")).status_code == 200
    await app.state.guard.aclose()


async def test_flockwatch_retrain_sends_its_token_and_says_why_it_was_refused(tmp_path: Path, tokens: Tokens) -> None:
    settings = TrainerSettings(_env_file=None, auth_tokens_file=tokens.path, trainer_models_root=tmp_path)
    server = EmbeddedServer.of(trainer_app(TrainerService(create_bus(settings), settings)), "127.0.0.1", 0)
    port = await server.start("trainer-http")
    runner = CliRunner()
    try:
        args = ["retrain", "--url", f"http://127.0.0.1:{port}"]
        without = await asyncio.to_thread(runner.invoke, cli, args, env={"FLOCKWATCH_TOKEN": ""})
        wrong = await asyncio.to_thread(runner.invoke, cli, args, env={"FLOCKWATCH_TOKEN": tokens.token["review"]})
    finally:
        await server.stop()
    assert without.exit_code == 2 and "401 Flockwatch trainer needs a bearer token" in " ".join(without.output.split())
    assert wrong.exit_code == 2 and f"403 token '{tokens.name['review']}' lacks scope 'admin'" in " ".join(
        wrong.output.split()
    )
