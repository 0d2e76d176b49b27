"""A corrupt model bundle announced on the bus (`ModelPublished`, over a real Redis) is refused by every service
that would load it: the voters, the arbiter and the feedback service keep the version they run, and keep
serving it; a sound bundle announced afterwards is loaded, so the refusals are not a reload that never works."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from flockwatch.cli.runtime import build
from flockwatch.common import topics
from flockwatch.common.artifacts import manifest_sha256, read_manifest, write_manifest
from flockwatch.common.events import Event, ModelPublished, TextSubmitted, Vote
from flockwatch.common.service import VoterService
from flockwatch.gateway.settings import GatewaySettings

from tests.fault_support import RedisServer
from tests.integration.feedback_support import fresh_schema, running_service


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path)
    server.start()
    yield server.url
    server.stop()


def tampered_copy(bundle: Path, to: Path) -> Path:
    """The bundle with one changed byte (or line) in each file a service loads; every file stays valid YAML,
    JSON or skops, only its sha256 no longer matches the manifest."""
    shutil.copytree(bundle, to)
    for name in ("rules.yaml", "labels.yaml"):
        (to / name).write_text((to / name).read_text() + "\n# changed after training\n")
    with (to / "classical.skops").open("ab") as fh:
        fh.write(b"\0")
    (to / "arbiter.json").write_text((to / "arbiter.json").read_text() + "\n")
    return to


def next_version(bundle: Path, to: Path) -> Path:
    """A sound new version: a rule's priority and the classical component's version changed, manifest rewritten."""
    shutil.copytree(bundle, to)
    rules = (to / "rules.yaml").read_text()
    assert "priority: 10" in rules
    (to / "rules.yaml").write_text(rules.replace("priority: 10", "priority: 11", 1))
    manifest = read_manifest(to, verify=False)
    components = {**manifest.components, "classical": "classical-v2"}
    write_manifest(to, manifest.model_copy(update={"version": "v2", "components": components}))
    return to


def announce(directory: Path, manifest_hash: str | None = None) -> ModelPublished:
    return ModelPublished(
        message_id=f"model:{directory.name}:{manifest_hash}",
        component="bundle",
        version=directory.name,
        path=str(directory),
        manifest_sha256=manifest_hash or manifest_sha256(directory),
    )


async def test_a_corrupt_bundle_is_refused_and_the_previous_version_keeps_serving(
    sms_bundle: Path, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    tampered = tampered_copy(sms_bundle, tmp_path / "tampered")
    v2 = next_version(sms_bundle, tmp_path / "v2")
    settings = GatewaySettings(
        _env_file=None, bus_url=redis_url, model_dir=sms_bundle, instance_id="reload", model_roots=[tmp_path]
    )
    bus, services = build(["regex_voter", "classical_voter", "arbiter"], settings)
    voters = {s.name: s for s in services if isinstance(s, VoterService)}
    arbiter = next(s for s in services if s.name == "arbiter")
    votes: list[Vote] = []

    @bus.subscribe(topics.VOTE_CAST, Vote, group="test-votes")
    async def keep(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    async with fresh_schema() as schema:
        feedback_settings = {"bus_url": redis_url, "model_dir": sms_bundle, "instance_id": "reload-feedback"}
        feedback_settings |= {"model_roots": [tmp_path]}  # where the test's versions lie
        feedback_settings |= {"feedback_labels": None, "feedback_rules": None}  # its task comes from the bundle
        async with running_service(schema, **feedback_settings) as feedback:
            for service in services:
                await service.start()
            before = {name: v.core for name, v in voters.items()}
            policy, task = arbiter.policy, feedback.task
            assert task.classes == ["ham", "spam"]
            async with bus:
                # a bundle whose files do not match its manifest; a sound bundle announced with another manifest
                await bus.publish([announce(tampered), announce(v2, manifest_sha256(sms_bundle))])
                await until(lambda: refusals(caplog) >= 8)  # 2 each: regex, classical, arbiter, feedback
                await bus.publish([TextSubmitted(message_id="text:r1", text_id="r1", text="WINNER! claim now")])
                await until(lambda: len(votes) >= 3)
                served = {(v.voter, v.model_version) for v in votes}
                assert {name: v.core for name, v in voters.items()} == before
                assert arbiter.policy is policy and feedback.task is task
                assert served == {(n, c.version) for c in before.values() if c for n in c.voters}

                await bus.publish([announce(v2)])
                await until(lambda: voters["classical_voter"].core is not before["classical_voter"])
                await until(lambda: feedback.task is not task and arbiter.policy is not policy)
            for service in services:
                await service.stop()
    assert refusals(caplog) == 8
    assert voters["classical_voter"].core.version == "classical-v2"
    assert voters["regex_voter"].core.version != before["regex_voter"].version
    assert str(v2) in feedback.task.source and feedback.task.classes == ["ham", "spam"]


def refusals(caplog: pytest.LogCaptureFixture) -> int:
    words = ("refused model", "kept the old task config")
    return sum(any(w in r.getMessage() for w in words) for r in caplog.records)


async def until(condition: object, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {seconds} s")
