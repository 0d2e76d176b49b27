"""The arbiter service's cascade on the bus: unsure texts get a VoteRequested, then a decision with the LLM vote.

The policy is fitted on synthetic voters (tests/unit/test_arbiter_policy.py) with a strong 'llm' voter;
the LLM service here is a bus handler that answers each request (the real one is tested in
tests/integration/test_llm_cpu.py). A request nobody answers ends in a decision at the cascade deadline.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import joblib
import numpy as np
import pytest
from flockwatch.arbiter.app import ArbiterService
from flockwatch.arbiter.config import CascadeConfig
from flockwatch.arbiter.fit import fit_policy
from flockwatch.arbiter.settings import ArbiterSettings
from flockwatch.common import topics
from flockwatch.common.artifacts import Manifest, write_manifest
from flockwatch.common.bus import Bus, create_bus
from flockwatch.common.events import Decision, Event, TextSubmitted, VoteRequested

from tests.unit.test_arbiter_policy import CLASSES, CONFIG, HARM, synthetic, vote


@pytest.fixture(scope="module")
def cascade_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle holding only an arbiter policy whose stacker knows a cascade voter 'llm'."""
    train, y_train = synthetic(1500, seed=21, llm=True)
    cal, y_cal = synthetic(1500, seed=22, llm=True)
    config = CONFIG.model_copy(update={"cascade": CascadeConfig(voters=["llm"], budget=0.3, deadline_ms=300)})
    policy = fit_policy(train, y_train, cal, y_cal, CLASSES, HARM, config, version="cascade-test")
    assert policy.calibration_report["risk"]["call_rate"] > 0, "the fixture must escalate some texts"
    out = tmp_path_factory.mktemp("cascade")
    (out / "arbiter.json").write_text(json.dumps(policy.to_dict()))
    joblib.dump(policy.sets, out / "conformal.joblib")
    write_manifest(out, Manifest(name="cascade", version="1"))
    return out


async def run(bundle: Path, answer_llm: bool, n: int = 60) -> tuple[list[Decision], list[VoteRequested]]:
    """Submit n synthetic texts with their cheap votes; collect decisions and requests."""
    settings = ArbiterSettings(model_dir=bundle, bus_url="memory://", arbiter_deadline_ms=2000)
    bus: Bus = create_bus(settings)
    arbiter = ArbiterService(bus, settings)
    decisions: list[Decision] = []
    requests: list[VoteRequested] = []
    votes, _ = synthetic(n, seed=23, llm=True)

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
            vote("llm", dict(zip(CLASSES, votes["llm"][int(m.text_id[1:])].tolist(), strict=True)), text_id=m.text_id)
            for m in msgs
        ]

    await arbiter.start()
    async with bus:
        await bus.publish([TextSubmitted(message_id=f"m{i}", text_id=f"t{i}", text=f"text {i}") for i in range(n)])
        await asyncio.sleep(0.05)
        cheap: list[Event] = []
        for i in range(n):
            for name in ("good", "fair", "noise"):
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
