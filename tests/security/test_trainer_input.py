"""Issue 19, no 500 from input: NUL (Postgres stores none) and lone surrogates in the trainer API's retrain
reason and run ids are refused with a 422 that says why."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.security.support import trainer_api


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with trainer_api(tmp_path) as (_, client):
        yield client


async def test_nul_in_a_run_id_is_a_422(client: httpx.AsyncClient) -> None:
    for answer in (await client.get("/training/%00"), await client.post("/training/run%00/cancel")):
        assert answer.status_code == 422, answer.text
        assert "NUL character" in answer.text
    assert (await client.get("/training/no-such-run")).status_code == 404


@pytest.mark.parametrize(("value", "why"), [(r"because\u0000", "NUL character"), (r"because\udfff", "lone surrogate")])
async def test_nul_or_a_lone_surrogate_in_the_reason_is_a_422(client: httpx.AsyncClient, value: str, why: str) -> None:
    answer = await client.post(
        "/training", content=f'{{"kind": "full", "reason": "{value}"}}', headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422, answer.text
    assert why in answer.text
    assert (await client.get("/training")).json() == []  # nothing was queued
