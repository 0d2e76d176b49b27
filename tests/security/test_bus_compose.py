"""docker-compose gives every Flockwatch service the key that signs model announcements (issue 19, item 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def test_every_flockwatch_service_in_compose_shares_the_bundle_key() -> None:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    ours = {name: s for name, s in services.items() if "FLOCKWATCH_BUS_URL" in (s.get("environment") or {})}
    assert {"gateway", "classical_voter", "arbiter", "trainer", "feedback"} <= set(ours)
    keys = {name: s["environment"].get("FLOCKWATCH_BUNDLE_KEY") for name, s in ours.items()}
    assert all(keys.values()), f"no FLOCKWATCH_BUNDLE_KEY: {sorted(n for n, k in keys.items() if not k)}"
    assert len(set(keys.values())) == 1  # one key, shared
    assert next(iter(keys.values())).startswith("${FLOCKWATCH_BUNDLE_KEY:?")  # required: no default key


def test_compose_redis_requires_a_password_that_every_service_uses_and_keeps_its_state_on_disk() -> None:
    """The join state, the prediction cache and the decision archive live in Redis: no anonymous client may
    read or write them, and they survive a restart (AOF on a volume)."""
    from urllib.parse import urlsplit

    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert '--requirepass "$$REDIS_PASSWORD"' in command and "--appendonly yes" in command
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${FLOCKWATCH_REDIS_PASSWORD:?")  # no default
    assert any(v.endswith(":/data") for v in redis["volumes"])
    ours = [s for s in services.values() if "FLOCKWATCH_STATE_URL" in (s.get("environment") or {})]
    assert len(ours) >= 5
    for service in ours:
        url = urlsplit(service["environment"]["FLOCKWATCH_STATE_URL"].split()[0])
        assert url.hostname == "redis" and url.password == "${FLOCKWATCH_REDIS_PASSWORD}"


def test_every_flockwatch_service_in_compose_signs_and_checks_bus_messages_with_one_required_key() -> None:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    ours = {name: s for name, s in services.items() if "FLOCKWATCH_BUS_URL" in (s.get("environment") or {})}
    keys = {s["environment"].get("FLOCKWATCH_BUS_KEY") for s in ours.values()}
    assert len(keys) == 1 and next(iter(keys)).startswith("${FLOCKWATCH_BUS_KEY:?")  # everyone, no default key
