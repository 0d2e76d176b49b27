"""The ws_voter service on a bus (in memory and over Redis): it loads a bundle and votes on submitted texts."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest
from flockwatch.common import topics
from flockwatch.common.artifacts import Manifest, write_manifest
from flockwatch.common.bus import create_bus
from flockwatch.common.events import Event, TextSubmitted, Vote
from flockwatch.common.labels import LabelConfig
from flockwatch.common.settings import CommonSettings
from flockwatch.common.voting import opinions_matrix
from flockwatch.regex_voter.model import RuleEngine
from flockwatch.regex_voter.rules import load_rules
from flockwatch.ws_voter.app import WSVoterService, save
from flockwatch.ws_voter.lfs import load_lfs
from flockwatch.ws_voter.model import WSModel

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sms"
TEXTS = {
    "spam": "URGENT! You have won a £1000 prize. Call 09061701461 now",
    "ham": "Sorry, I'll be home late tonight, love you",
    "none": "12 34",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with the SMS rules and a WS model whose LFs include a voter LF on the regex voter."""
    directory = tmp_path_factory.mktemp("ws-bundle")
    shutil.copyfile(CONFIGS / "labels.yaml", directory / "labels.yaml")
    shutil.copyfile(CONFIGS / "rules.yaml", directory / "rules.yaml")
    (directory / "lfs.yaml").write_text(
        (CONFIGS / "lfs.yaml").read_text() + "\nvoters:\n  - voter: regex\n    min_prob: 0.9\n"
    )
    labels = LabelConfig.load(directory / "labels.yaml")
    engine = RuleEngine(load_rules(directory / "rules.yaml", labels), labels)
    texts = [
        *(f"Claim your FREE prize {i}: txt WIN to 8{i:04d}" for i in range(20)),
        *(f"see you at home later {i} :)" for i in range(20)),
    ]
    regex = opinions_matrix(engine.predict(texts), labels.names)
    lfs = load_lfs(labels, directory / "rules.yaml", directory / "lfs.yaml")
    save(WSModel.fit(texts, labels, lfs, {"regex": regex}), directory)
    (directory / "lfs.yaml").unlink()
    write_manifest(directory, Manifest(name="sms", version="v1", components={"ws": "ws-test"}))
    return directory


@pytest.mark.parametrize("url", ["memory://", "redis://127.0.0.1:6379/11"])
async def test_ws_voter_votes_on_submitted_texts(bundle: Path, url: str) -> None:
    if url.startswith("redis"):
        import redis.asyncio as aioredis

        client = aioredis.from_url(url)
        await client.flushdb()
        await client.aclose()
    run = uuid.uuid4().hex[:8]
    bus = create_bus(CommonSettings(bus_url=url, model_dir=bundle, instance_id=run, batch_wait_ms=2))
    service = WSVoterService(bus, bus.settings)
    votes: list[Vote] = []

    @bus.subscribe(topics.VOTE_CAST, Vote, group=f"sink-{run}")
    async def keep(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    await service.start()
    async with bus:
        await asyncio.sleep(0.2)  # Redis consumer groups start at '$': let them exist before publishing
        await bus.publish(
            [TextSubmitted(message_id=f"{run}-{k}", text_id=f"{run}-{k}", text=t) for k, t in TEXTS.items()]
        )
        for _ in range(500):
            if len(votes) >= len(TEXTS):
                break
            await asyncio.sleep(0.02)
    by_text = {v.text_id.removeprefix(f"{run}-"): v for v in votes}
    assert set(by_text) == set(TEXTS)
    assert {v.voter for v in votes} == {"ws"} and {v.model_version for v in votes} == {"ws-test"}
    spam, ham, none = by_text["spam"], by_text["ham"], by_text["none"]
    assert spam.probabilities is not None and max(spam.probabilities, key=spam.probabilities.__getitem__) == "spam"
    assert "voter:regex>=0.9" in spam.evidence  # the voter LF read the regex voter loaded from the same bundle
    assert ham.probabilities is not None and max(ham.probabilities, key=ham.probabilities.__getitem__) == "ham"
    assert none.abstain and none.abstain_reason == "0 labeling function(s) fired; at least 1 needed"
