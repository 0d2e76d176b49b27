"""Issue 19, no 500 from input: invalid Unicode (a lone surrogate, which JSON's `\\ud800` escape allows) and NUL
in a text or its metadata are refused at the gateway with a 422 that says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.support import fake_arbiter, fake_bundle
from tests.stack import stack

SURROGATE = r"bad \ud800 text"  # a JSON escape: the body itself is plain ASCII
NUL = r"bad \u0000 text"


def bodies(value: str) -> list[tuple[str, str]]:
    """Every place a client's string goes: text, a metadata value, a metadata key, on all three routes."""
    one = [
        f'{{"text": "{value}"}}',
        f'{{"text": "fine", "metadata": {{"source": "{value}"}}}}',
        f'{{"text": "fine", "metadata": {{"{value}": "x"}}}}',
    ]
    return [(route, body) for body in one for route in ("/predict", "/texts")] + [
        ("/predict/batch", f'{{"texts": [{{"text": "fine"}}, {body}]}}') for body in one
    ]


@pytest.mark.parametrize(("value", "why"), [(SURROGATE, "lone surrogate U+D800"), (NUL, "NUL character (U+0000)")])
async def test_invalid_unicode_and_nul_are_a_422_saying_why(tmp_path: Path, value: str, why: str) -> None:
    async with stack(fake_bundle(tmp_path / "bundle"), ["gateway"], extra=fake_arbiter()) as (client, _):
        answers = [
            (route, await client.post(route, content=body, headers={"content-type": "application/json"}))
            for route, body in bodies(value)
        ]
        still_fine = await client.post("/predict", json={"text": "a fine text 😀", "metadata": {"k": "é"}})
    for route, answer in answers:
        assert answer.status_code == 422, (route, answer.text)
        assert why in answer.json()["detail"], (route, answer.text)
    assert still_fine.status_code == 200
