"""A voter in "auto" mode votes on every text or only when asked, as the bundle in force says, across reloads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from flockwatch.common import topics
from flockwatch.common.artifacts import Manifest, manifest_sha256, write_manifest
from flockwatch.common.bus import create_bus
from flockwatch.common.events import Event, ModelPublished, TextSubmitted, Vote, VoteRequested
from flockwatch.common.service import VoterCore, VoterService
from flockwatch.common.settings import CommonSettings
from flockwatch.common.voting import Opinion


class _Core(VoterCore):
    version = "fake-1"
    voters = ("minilm",)

    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        return {"minilm": [Opinion(probabilities={"a": 0.9, "b": 0.1}, evidence=("fake",)) for _ in texts]}


class _Voter(VoterService):
    name = "embedding_voter"

    def load(self, model_dir: Path) -> VoterCore | None:
        return _Core()


def _bundle(root: Path, name: str, tiers: list[dict[str, object]]) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "arbiter.json").write_text(json.dumps({"config": {"cascade": {"tiers": tiers}}}))
    write_manifest(folder, Manifest(name="t", version=name, components={}))
    return folder


async def test_auto_mode_follows_the_bundles_plan(tmp_path: Path) -> None:
    cascade = _bundle(tmp_path, "cascade", [{"voters": ["minilm"], "budget": 0.3}])
    every = _bundle(tmp_path, "every", [])
    bus = create_bus(CommonSettings(bus_url="memory://", model_dir=cascade, batch_wait_ms=0))
    voter = _Voter(bus, bus.settings, mode="auto")
    votes: list[Vote] = []

    @bus.subscribe(topics.VOTE_CAST, Vote, group="sink")
    async def keep(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    async def wait_for(n: int) -> None:
        for _ in range(200):
            if len(votes) >= n:
                return
            await asyncio.sleep(0.01)

    await voter.start()
    async with bus:
        assert not voter.every_text
        await bus.publish([TextSubmitted(message_id="m1", text_id="t1", text="x")])
        now = datetime.now(UTC)
        ask = VoteRequested(
            message_id="r1", text_id="t2", text="y", voters=["minilm"], reason="unsure", deadline_ms=5000, timestamp=now
        )
        await bus.publish([ask])
        await wait_for(1)
        await asyncio.sleep(0.1)
        assert [v.text_id for v in votes] == ["t2"]  # asked: yes; merely submitted: no
        published = ModelPublished(
            message_id="p1",
            component="bundle",
            version="every",
            path=str(every),
            manifest_sha256=manifest_sha256(every),
        )
        await bus.publish([published])
        for _ in range(200):
            if voter.every_text:
                break
            await asyncio.sleep(0.01)
        assert voter.every_text
        await bus.publish([TextSubmitted(message_id="m3", text_id="t3", text="z")])
        await wait_for(2)
        assert [v.text_id for v in votes] == ["t2", "t3"]
