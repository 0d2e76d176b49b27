"""The review page: its HTML/JS contract with the API, and labelling by keyboard in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from flockwatch.common.tokens import add_token
from flockwatch.feedback.app import FeedbackService

from tests.feedback_events import decision, text, vote
from tests.integration.feedback_support import api_client, count, eventually, fresh_schema, running_service

CHROMIUM = os.environ.get("FLOCKWATCH_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
SCREENSHOT = os.environ.get("FLOCKWATCH_REVIEW_SCREENSHOT")  # where to save a PNG of the page, if set


async def seed(service: FeedbackService) -> None:
    """Two texts the voters disagree on (the first with more harm at stake) and one they agree on."""
    split = {"ham": 0.1, "spam": 0.9}, {"ham": 0.9, "spam": 0.1}
    await service.bus.publish(
        [text("a", "You won a prize, call now"), text("b", "lunch at noon?"), text("c", "see you at home")]
    )
    await service.bus.publish(
        [
            decision(
                "a",
                None,
                [vote("a", "regex", split[0], ("spam-prize-claim",)), vote("a", "tfidf_lr", split[1])],
                prediction_set=["ham", "spam"],
                confidence=0.5,
            ),
            decision(
                "b",
                "ham",
                [vote("b", "regex", {"ham": 0.6, "spam": 0.4}), vote("b", "tfidf_lr", {"ham": 0.4, "spam": 0.6})],
                confidence=0.55,
                abstain=False,
            ),
            decision("c", "ham", [vote("c", "tfidf_lr", split[1])]),
        ]
    )
    await eventually(lambda: _decisions(service, 3))


async def _decisions(service: FeedbackService, n: int) -> bool:
    return await count(service, "decisions") == n


async def test_review_page_contract_with_the_api() -> None:
    async with fresh_schema() as schema, running_service(schema) as service:
        await seed(service)
        async with api_client(service) as client:
            page = await client.get("/review")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            html = page.text
            for element in (
                'id="text"',
                'id="labels"',
                'id="reviewer"',
                'id="queue-count"',
                'id="status"',
                'id="thumbs-up"',
                'id="skip"',
                "data-text-id",
            ):
                assert element in html
            # the page calls these endpoints (relative, so it works behind a path prefix) with these keys
            for call in (
                'getJSON("labels")',
                "review/queue?",
                'fetch("feedback"',
                "crypto.randomUUID()",
                'event.key === "y"',
                'event.key === "s"',
                "Number(event.key)",
            ):
                assert call in html
            labels = (await client.get("/labels")).json()
            assert [label["name"] for label in labels["labels"]] == ["ham", "spam"]
            queue = (await client.get("/review/queue", params={"limit": 50, "reviewer": "ann"})).json()
            assert [i["text_id"] for i in queue["items"]] == ["a", "b"]
            item = queue["items"][0]
            assert {"text_id", "text", "prediction", "confidence", "prediction_set", "reasons", "voters"} <= item.keys()
            assert item["voters"]["regex"]["evidence"] == ["spam-prize-claim"]


class DevTools:
    """A minimal Chrome DevTools Protocol client over the page's websocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def press(self, key: str) -> None:
        code = f"Digit{key}" if key.isdigit() else f"Key{key.upper()}"
        for kind in ("keyDown", "keyUp"):
            await self.call(
                "Input.dispatchKeyEvent",
                type=kind,
                key=key,
                code=code,
                text=key if kind == "keyDown" else "",
                windowsVirtualKeyCode=ord(key.upper()),
            )

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{expression} stayed falsy for {timeout} s")
            await asyncio.sleep(0.05)


@pytest.fixture
async def browser() -> AsyncIterator[DevTools]:
    if CHROMIUM is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; or set FLOCKWATCH_CHROMIUM)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            for _ in range(300):
                if port_file.exists() and port_file.read_text().count("\n") >= 1:
                    break
                await asyncio.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            async with httpx.AsyncClient() as http:
                targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with websockets.connect(url, max_size=None) as ws:
                yield DevTools(ws)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def test_a_reviewer_labels_queued_texts_with_the_keyboard_in_chromium(browser: DevTools) -> None:
    async with fresh_schema() as schema, running_service(schema, feedback_serve_http=True, feedback_port=0) as service:
        await seed(service)
        await browser.call("Page.enable")
        await browser.call("Page.navigate", url=f"http://127.0.0.1:{service.http_port}/review?reviewer=ann")
        current = "document.getElementById('item').dataset.textId"
        assert await browser.wait_for(current) == "a"  # the highest priority first
        assert await browser.js("document.getElementById('text').textContent") == "You won a prize, call now"
        assert await browser.js("document.getElementById('queue-count').textContent") == "2"
        assert await browser.js("document.querySelectorAll('#labels button').length") == 2
        await browser.press("2")  # the second label: spam
        assert await browser.wait_for(f"{current} === 'b' && {current}")
        stored = await service.store.pool.fetchrow("SELECT text_id, label, reviewer_id, source FROM feedback")
        assert dict(stored) == {"text_id": "a", "label": "spam", "reviewer_id": "ann", "source": "http"}
        if SCREENSHOT:
            shot = await browser.call("Page.captureScreenshot", format="png")
            Path(SCREENSHOT).write_bytes(base64.b64decode(shot["data"]))
        await browser.press("y")  # agree with the prediction (ham)
        shown = "document.getElementById('text').textContent"
        assert "Nothing to review" in await browser.wait_for(f"{shown}.includes('Nothing') && {shown}")
        rows = await service.store.pool.fetch("SELECT text_id, label, thumbs FROM feedback ORDER BY seq")
        assert [tuple(r) for r in rows] == [("a", "spam", None), ("b", None, "up")]
        assert "Saved" in await browser.js("document.getElementById('status').textContent")


async def test_with_auth_on_the_page_asks_for_a_token_then_labels_with_it_in_chromium(
    browser: DevTools, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.yaml"
    token = add_token(tokens, "ann", ["review"])
    overrides = {"feedback_serve_http": True, "feedback_port": 0, "auth_tokens_file": tokens}
    async with fresh_schema() as schema, running_service(schema, **overrides) as service:
        await seed(service)
        await browser.call("Page.enable")
        await browser.call("Page.navigate", url=f"http://127.0.0.1:{service.http_port}/review?reviewer=ann")
        message = await browser.wait_for("document.getElementById('status').textContent")
        assert "HTTP 401: enter a token with the review scope" in message
        await browser.js(
            f"const t = document.getElementById('token'); t.value = '{token}'; t.dispatchEvent(new Event('change'))"
        )
        current = "document.getElementById('item').dataset.textId"
        assert await browser.wait_for(current) == "a"
        await browser.press("2")  # spam, posted with the token (review includes the feedback scope)
        assert await browser.wait_for(f"{current} === 'b' && {current}")
        stored = await service.store.pool.fetchrow("SELECT text_id, label, reviewer_id FROM feedback")
        assert dict(stored) == {"text_id": "a", "label": "spam", "reviewer_id": "ann"}
        assert await browser.js("sessionStorage.getItem('flockwatch.token')") == token
        assert token not in await browser.js("location.href")
