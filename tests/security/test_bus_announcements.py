"""Code from the bus (issue 19, item 6): a `ModelPublished` names a bundle, and loading a bundle unpickles it.
Every service that reacts to announcements (voters, arbiter, feedback, trainer, the gateway's cache) takes only
bundles under a models root, and with `FLOCKWATCH_BUNDLE_KEY` set only announcements signed with it; all of
them decide alike, so none moves to a version another refuses."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import joblib
import pytest
import redis.asyncio as aioredis
from flockwatch.cli.runtime import build
from flockwatch.common.artifacts import Manifest, dump_skops, manifest_sha256, write_manifest
from flockwatch.common.events import ModelPublished
from flockwatch.common.service import Service, VoterService
from flockwatch.gateway.cache import PredictionCache
from flockwatch.gateway.settings import GatewaySettings
from flockwatch.trainer import registry
from pydantic import SecretStr

from tests.security.support import REDIS, VERSIONS, fake_bundle

KEY = "a-key-the-services-share"
REACTING = ["regex_voter", "classical_voter", "ws_voter", "arbiter", "feedback", "trainer", "gateway"]


class Detonator:
    """Unpickled, it makes a directory: the proof that a pickle from the bus ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.makedirs, (str(self.marker),))


class Rebuilt:
    """Rebuilt from a skops file (were its type trusted), it makes a directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict[str, str]) -> None:
        os.makedirs(state["marker"])


def hostile_bundle(directory: Path, marker: Path) -> Path:
    """A bundle whose manifest is consistent with its files and whose classical pickle runs code."""
    directory.mkdir(parents=True)
    joblib.dump(Detonator(marker), directory / "classical.joblib")
    write_manifest(directory, Manifest(name="sms", version="evil-1", components={**VERSIONS, "classical": "evil"}))
    return directory


def models_root(tmp_path: Path) -> Path:
    """`models/sms` with version v1 (manifest only) and `current` → v1; returns the `current` the services load."""
    root = tmp_path / "models" / "sms"
    fake_bundle(root / "v1")
    registry.point_current(root, "v1")
    return root / "current"


def announce(directory: Path, component: str = "bundle", **fields: Any) -> ModelPublished:
    return ModelPublished(
        message_id=f"model:{uuid.uuid4().hex[:8]}",
        component=component,
        version=directory.name,
        path=str(directory),
        manifest_sha256=manifest_sha256(directory),
        **fields,
    )


class Stack(NamedTuple):
    services: dict[str, Service]
    cache: PredictionCache
    reactions: dict[str, list[Path]]  # service → the bundle directories it went on to load


@asynccontextmanager
async def stack(model_dir: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> AsyncIterator[Stack]:
    """Every service that reacts to `ModelPublished`, built as `flockwatch serve` builds them; what each goes on to
    load is recorded (the classical voter's real loader runs: it unpickles)."""
    prefix = f"fw-sec-bus-{uuid.uuid4().hex[:8]}"
    gateway = GatewaySettings(
        _env_file=None, model_dir=model_dir, gateway_cache_url=REDIS, gateway_cache_prefix=prefix, **settings
    )
    _, built = build([n for n in REACTING if n != "gateway"], gateway)
    services = {s.name: s for s in built}
    reactions: dict[str, list[Path]] = {name: [] for name in REACTING}

    def recorder(name: str, real: Callable[..., Any] | None = None) -> Callable[..., Any]:
        def record(*args: Any) -> Any:
            reactions[name].append(Path(next(a for a in reversed(args) if isinstance(a, Path))))
            if real is None:
                raise ValueError("recorded, not loaded")
            return real(*args)

        return record

    for name, service in services.items():
        if isinstance(service, VoterService):
            real = service.load if name == "classical_voter" else None
            monkeypatch.setattr(service, "load", recorder(name, real))
    monkeypatch.setattr("flockwatch.arbiter.app.load_policy", recorder("arbiter"))
    monkeypatch.setattr("flockwatch.feedback.app.load_task", recorder("feedback"))

    async def reset(bundle: Path | None) -> None:
        reactions["trainer"].append(Path(str(bundle)))

    monkeypatch.setattr(services["trainer"].drift, "reset", reset)
    cache = PredictionCache(gateway)
    redis = aioredis.from_url(REDIS)
    try:
        async with cache:
            monkeypatch.setattr(cache, "_switch", recorder("gateway", cache._switch))
            yield Stack(services, cache, reactions)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def deliver(s: Stack, *msgs: ModelPublished) -> None:
    """Hand the announcements to every service's ModelPublished handler, as the bus does."""
    for service in s.services.values():
        handler = service.drift.on_model if service.name == "trainer" else service.on_model
        await handler(list(msgs))
    await s.cache.on_models(list(msgs))


@pytest.fixture
def unsigned_warning_reset(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from flockwatch.common import announcements  # here: the module did not exist before (the test fails, not errors)

    monkeypatch.setattr(announcements, "_warned", False)
    yield


def refusals(caplog: pytest.LogCaptureFixture) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in caplog.records:
        if r.levelno >= logging.ERROR and "refused model" in r.getMessage():
            who = r.getMessage().split(":", 1)[0]
            counts[who] = counts.get(who, 0) + 1
    return counts


async def test_a_bundle_outside_the_models_root_is_refused_by_every_service_and_its_pickle_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    marker = tmp_path / "pickle-ran"
    evil = hostile_bundle(tmp_path / "elsewhere" / "evil-1", marker)
    async with stack(models_root(tmp_path), monkeypatch) as s:
        versions = s.cache.versions
        await s.cache._redis.set(f"{s.cache.prefix}:{versions.digest}:kept", b"{}")
        await deliver(s, announce(evil), announce(evil, "classical_voter"), announce(evil, "arbiter"))
        assert await s.cache._redis.exists(f"{s.cache.prefix}:{versions.digest}:kept")
    assert not marker.exists(), "the announced pickle ran"
    assert s.reactions == {name: [] for name in REACTING}
    assert s.cache.versions == versions and s.cache._purge is None  # nothing switched, nothing purged
    assert set(refusals(caplog)) == set(REACTING)


@pytest.mark.parametrize("file", ["classical.joblib", "classical.skops"])
async def test_a_hostile_bundle_under_the_models_root_runs_no_code_in_the_voter_that_loads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, file: str
) -> None:
    """Past every announcement check (under the root, consistent, no key set): the classical voter's real loader
    still runs nothing from the bundle. A pickle is refused by name; a skops file naming a type outside the
    voter's allow-list is refused before anything in it is constructed. The voter keeps its model."""
    caplog.set_level(logging.ERROR)
    marker = tmp_path / "code-ran"
    model_dir = models_root(tmp_path)
    evil = model_dir.parent / "evil-1"
    if file.endswith(".joblib"):
        hostile_bundle(evil, marker)
    else:
        evil.mkdir()
        dump_skops(Rebuilt(marker), evil / file)
        write_manifest(evil, Manifest(name="sms", version="evil-1", components={**VERSIONS, "classical": "evil"}))
    async with stack(model_dir, monkeypatch) as s:
        voter = s.services["classical_voter"]
        before = voter.core
        await deliver(s, announce(evil, "classical_voter"))
        assert voter.core is before
    assert not marker.exists()
    assert s.reactions["classical_voter"] == [evil]  # it did try: the loader is what refused
    reason = "is a pickle" if file.endswith(".joblib") else "outside its allow-list"
    assert any(reason in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_a_symlink_under_the_models_root_that_leads_outside_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pickle-ran"
    evil = hostile_bundle(tmp_path / "elsewhere" / "evil-1", marker)
    model_dir = models_root(tmp_path)
    (model_dir.parent / "evil-1").symlink_to(evil)
    async with stack(model_dir, monkeypatch) as s:
        await deliver(s, announce(model_dir.parent / "evil-1"))
    assert not marker.exists()
    assert s.reactions == {name: [] for name in REACTING}


async def test_a_configured_models_root_is_allowed_alike_by_every_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = fake_bundle(tmp_path / "mirror" / "v2")
    async with stack(models_root(tmp_path), monkeypatch, model_roots=str(tmp_path / "mirror")) as s:
        await deliver(s, announce(other))
    assert s.reactions == {name: [other] for name in REACTING}


@pytest.mark.parametrize("signature", ["none", "other key", "fields changed after signing"])
async def test_with_a_key_an_announcement_not_signed_with_it_is_refused_by_every_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, signature: str
) -> None:
    caplog.set_level(logging.ERROR)
    model_dir = models_root(tmp_path)
    v2 = fake_bundle(model_dir.parent / "v2")
    forged: dict[str, Callable[[], ModelPublished]] = {
        "none": lambda: announce(v2),
        "other key": lambda: registry.announcement(v2, SecretStr("not-the-key")),
        # a genuine announcement of v1, re-pointed at v2 (both under the root, both sound)
        "fields changed after signing": lambda: registry.announcement(model_dir.resolve(), SecretStr(KEY)).model_copy(
            update={"path": str(v2), "version": "v2", "manifest_sha256": manifest_sha256(v2)}
        ),
    }
    msg = forged[signature]()
    async with stack(model_dir, monkeypatch, bundle_key=KEY) as s:
        await deliver(s, msg)
    assert s.reactions == {name: [] for name in REACTING}
    assert set(refusals(caplog)) == set(REACTING)


async def test_with_a_key_the_registrys_signed_announcement_is_taken_by_every_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = models_root(tmp_path)
    v2 = fake_bundle(model_dir.parent / "v2")
    async with stack(model_dir, monkeypatch, bundle_key=KEY) as s:
        signed = registry.announcement(v2, s.services["arbiter"].settings.bundle_key)
        assert signed.signature
        await deliver(s, signed)
    assert s.reactions == {name: [v2.resolve()] for name in REACTING}


async def test_without_a_key_services_warn_once_and_keep_taking_bundles_from_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, unsigned_warning_reset: None
) -> None:
    caplog.set_level(logging.WARNING)
    model_dir = models_root(tmp_path)
    v2 = fake_bundle(model_dir.parent / "v2")
    async with stack(model_dir, monkeypatch) as s:
        await deliver(s, announce(v2))
    warnings = [r for r in caplog.records if "ANNOUNCEMENTS ARE UNSIGNED" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert s.reactions == {name: [v2.resolve()] for name in REACTING}
