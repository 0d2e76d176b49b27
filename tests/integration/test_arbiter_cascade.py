"""The arbiter service's cascade on the bus: unsure texts get a VoteRequested, then a decision with the LLM vote.

The policy is fitted on synthetic voters (tests/unit/test_arbiter_policy.py) with a strong 'llm' voter
(and, for the two-tier cascade, a 'mid' voter asked first); the expensive voters here are a bus handler
that answers each request (the real LLM voter is tested in tests/integration/test_llm_cpu.py). A request
nobody answers ends in a decision at the cascade deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flockwatch.arbiter.app import ArbiterService
from flockwatch.arbiter.config import CascadeConfig
from flockwatch.arbiter.conformal import save_sets
from flockwatch.arbiter.fit import fit_policy
from flockwatch.arbiter.settings import ArbiterSettings
from flockwatch.common import topics
from flockwatch.common.artifacts import Manifest, write_manifest
from flockwatch.common.bus import Bus, create_bus
from flockwatch.common.events import Decision, Event, TextSubmitted, VoteRequested

from tests.unit.test_arbiter_policy import CLASSES, CONFIG, HARM, noisy_probs, synthetic, vote

CHEAP = ("good", "fair", "noise")


Data = Callable[[int, int], tuple[dict[str, np.ndarray], np.ndarray]]


def one_tier_data(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    return synthetic(n, seed, llm=True)


def two_tier_data(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    votes, y = synthetic(n, seed, llm=True)
    votes["mid"] = noisy_probs(y, 2.5, np.random.default_rng(seed + 100))
    return votes, y


def bundle(out: Path, cascade: CascadeConfig, data: Data) -> Path:
    """A bundle holding only an arbiter policy fitted on synthetic voters with the given cascade."""
    (train, y_train), (cal, y_cal) = data(1500, 21), data(1500, 22)
    config = CONFIG.model_copy(update={"cascade": cascade})
    policy = fit_policy(train, y_train, cal, y_cal, CLASSES, HARM, config, version="cascade-test")
    assert all(r > 0 for r in policy.calibration_report["risk"]["reach"]), "the fixture must use every tier"
    (out / "arbiter.json").write_text(json.dumps(policy.to_dict()))
    save_sets(policy.sets, out)
    write_manifest(out, Manifest(name="cascade", version="1"))
    return out


@pytest.fixture(scope="module")
def cascade_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tier: the 'llm'."""
    cascade = CascadeConfig(voters=["llm"], budget=0.3, deadline_ms=300)
    return bundle(tmp_path_factory.mktemp("cascade"), cascade, one_tier_data)


@pytest.fixture(scope="module")
def two_tier_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiers: 'mid' for up to half the texts, then 'llm' for up to 30 %."""
    tiers = [{"voters": ["mid"], "budget": 0.5}, {"voters": ["llm"], "budget": 0.3}]
    cascade = CascadeConfig.model_validate({"tiers": tiers, "deadline_ms": 300})
    return bundle(tmp_path_factory.mktemp("two-tier"), cascade, two_tier_data)


async def run(
    bundle: Path, answer_llm: bool, n: int = 60, votes: dict[str, np.ndarray] | None = None
) -> tuple[list[Decision], list[VoteRequested]]:
    """Submit n synthetic texts with their cheap votes; collect decisions and requests."""
    settings = ArbiterSettings(model_dir=bundle, bus_url="memory://", arbiter_deadline_ms=2000)
    bus: Bus = create_bus(settings)
    arbiter = ArbiterService(bus, settings)
    decisions: list[Decision] = []
    requests: list[VoteRequested] = []
    votes = votes if votes is not None else one_tier_data(n, 23)[0]

    @bus.subscribe(topics.DECISION_MADE, Decision, group="test-decisions")
    async def keep(msgs: list[Decision]) -> list[Event]:
        decisions.extend(msgs)
        return []

    @bus.subscribe(topics.VOTE_REQUESTED, VoteRequested, group="test-llm")
    async def llm(msgs: list[VoteRequested]) -> list[Event]:
        requests.extend(msgs)
        if not answer_llm:
            return []
        return [
            vote(v, dict(zip(CLASSES, votes[v][int(m.text_id[1:])].tolist(), strict=True)), text_id=m.text_id)
            for m in msgs
            for v in m.voters
        ]

    await arbiter.start()
    async with bus:
        await bus.publish([TextSubmitted(message_id=f"m{i}", text_id=f"t{i}", text=f"text {i}") for i in range(n)])
        await asyncio.sleep(0.05)
        cheap: list[Event] = []
        for i in range(n):
            for name in CHEAP:
                p = votes[name][i]
                probs = None if np.isnan(p).any() else dict(zip(CLASSES, p.tolist(), strict=True))
                cheap.append(vote(name, probs, text_id=f"t{i}"))
        await bus.publish(cheap)
        for _ in range(200):
            if len(decisions) == n:
                break
            await asyncio.sleep(0.02)
    await arbiter.stop()
    return decisions, requests


async def test_unsure_texts_are_escalated_and_decided_with_the_llm_vote(cascade_bundle: Path) -> None:
    decisions, requests = await run(cascade_bundle, answer_llm=True)
    assert sorted(d.text_id for d in decisions) == sorted(f"t{i}" for i in range(60))  # one decision per text
    assert 0 < len(requests) < 60 and all(r.voters == ["llm"] and r.text for r in requests)
    asked = {r.text_id for r in requests}
    for d in decisions:
        assert d.escalated == (d.text_id in asked)
        assert ("llm" in {v.voter for v in d.votes}) == (d.text_id in asked)


async def test_an_unanswered_request_still_ends_in_a_decision(cascade_bundle: Path) -> None:
    decisions, requests = await run(cascade_bundle, answer_llm=False)
    assert len(decisions) == 60 and requests
    asked = {r.text_id for r in requests}
    late = [d for d in decisions if d.text_id in asked]
    assert all(d.escalated and "llm" not in {v.voter for v in d.votes} and "llm" in d.missing_voters for d in late)
    assert all(d.abstain_reason for d in late if d.abstain)


async def test_two_tiers_are_asked_in_rounds_cheapest_first(two_tier_bundle: Path) -> None:
    n = 80
    decisions, requests = await run(two_tier_bundle, answer_llm=True, n=n, votes=two_tier_data(n, 24)[0])
    assert sorted(d.text_id for d in decisions) == sorted(f"t{i}" for i in range(n))
    first = {r.text_id for r in requests if r.tier == 1}
    second = {r.text_id for r in requests if r.tier == 2}
    assert all(r.voters == (["mid"] if r.tier == 1 else ["llm"]) for r in requests)
    assert first and second and second <= first  # the LLM only after the mid tier was asked
    for d in decisions:
        voters = {v.voter for v in d.votes}
        asked = 2 if d.text_id in second else 1 if d.text_id in first else 0
        assert [r.tier for r in d.rounds] == list(range(asked + 1))
        assert ("mid" in voters) == (asked >= 1) and ("llm" in voters) == (asked == 2)
