"""The gateway's prediction cache: a text seen before (same text, same metadata, same models) is answered from
Redis without a trip through the voters and the arbiter.

Key: `<prefix>:<versions digest>:<sha256 of text and metadata>`. The digest covers the bundle's version, its
manifest sha256 and each component's version, so a new model is never answered from an older one's entries;
on `ModelPublished` the gateway moves to the new digest and deletes every entry under another one. A
decision is kept only when it is complete (no voter missing) and made by the versions in force: a decision
made while the voters were still reloading is not kept, nor one whose id was looked up for two different
texts (the pipeline decides an id once: the decision may be the other text's). Cached answers are not
published on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import redis.asyncio as aioredis
from flockwatch.common import telemetry
from flockwatch.common.announcements import Announcements
from flockwatch.common.artifacts import ArtifactError, manifest_sha256, read_manifest
from flockwatch.common.events import Decision, Event, ModelPublished, TextSubmitted, Vote, utcnow
from flockwatch.gateway.settings import GatewaySettings
from flockwatch.gateway.tenancy import tenant_of_id
from pydantic import ValidationError
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
REDIS_TIMEOUT_S = 0.5  # a slow cache must not slow predictions down: past this, a lookup is a miss
PURGE_BATCH = 500
V = TypeVar("V")


@dataclass(frozen=True)
class Versions:
    """The model versions in force: the bundle, its manifest hash, and each component's version."""

    bundle: str
    manifest_sha256: str
    components: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, directory: Path) -> Versions:
        """The versions of a bundle directory (its manifest; the voters verify the files when they load it)."""
        manifest = read_manifest(directory, verify=False)
        return cls(manifest.version, manifest_sha256(directory), dict(manifest.components))

    @property
    def digest(self) -> str:
        """A short hash of everything that makes a decision (part of every key)."""
        parts = [self.bundle, self.manifest_sha256, *(f"{k}={v}" for k, v in sorted(self.components.items()))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def made(self, decision: Decision) -> bool:
        """Whether every vote and the arbiter of `decision` carry a version in force."""
        known = set(self.components.values())
        return decision.arbiter_version in known and all(v.model_version in known for v in decision.votes)


def text_hash(msg: TextSubmitted) -> str:
    """sha256 of a text and its metadata (metadata can put a text in another slice, with other thresholds)."""
    canonical = json.dumps([msg.text, msg.metadata], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class PredictionCache:
    """Look texts up before publishing them, keep their decisions when they come, forget on ModelPublished."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.url = (settings.gateway_cache_url or settings.shared_state_url) if settings.gateway_cache else None
        self.prefix = settings.gateway_cache_prefix
        self.versions: Versions | None = None
        self._redis: aioredis.Redis | None = None
        # text id → the key of the text published under it after a miss; None when two texts were looked up under
        # one id: the decision is for whichever the pipeline decided first, so it is kept under neither
        self._keys: OrderedDict[str, str | None] = OrderedDict()
        self._served: OrderedDict[str, None] = OrderedDict()  # text ids answered from the cache
        self._purge: asyncio.Task[int] | None = None
        self._warned_at = 0.0
        self.announcements = Announcements(settings, "gateway")

    @property
    def active(self) -> bool:
        """Connected, and the model versions are known."""
        return self._redis is not None and self.versions is not None

    async def __aenter__(self) -> PredictionCache:
        if self.url is None:
            why = "FLOCKWATCH_GATEWAY_CACHE=false" if not self.settings.gateway_cache else "no Redis configured"
            log.info("gateway: prediction cache off (%s)", why)
            return self
        self._redis = aioredis.from_url(
            self.url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._switch(self.settings.model_dir, "bundle", None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._purge is not None:
            self._purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _key(self, msg: TextSubmitted) -> str:
        assert self.versions is not None
        if self.settings.gateway_cache_scope == "tenant" and (tenant := tenant_of_id(msg.text_id)) is not None:
            # a tenant's own keyspace (the tenant hashed: a token name has no place in a Redis key listing)
            scope = hashlib.sha256(tenant.encode()).hexdigest()[:16]
            return f"{self.prefix}:{self.versions.digest}:{scope}:{text_hash(msg)}"
        return f"{self.prefix}:{self.versions.digest}:{text_hash(msg)}"

    async def lookup(self, msgs: Sequence[TextSubmitted]) -> list[Decision]:
        """The cached decisions for these texts, each re-addressed to its text id; the misses' keys are noted."""
        if not self.active or not msgs:
            return []
        assert self._redis is not None
        start = time.perf_counter()
        keys = [self._key(m) for m in msgs]
        try:
            values = await self._redis.mget(keys)
        except (RedisError, OSError) as exc:
            self._trouble("lookup", exc)
            telemetry.CACHE_LOOKUPS.labels("error").inc(len(msgs))
            return []
        elapsed_ms = (time.perf_counter() - start) * 1000
        found: list[Decision] = []
        for msg, key, raw in zip(msgs, keys, values, strict=True):
            decision = _readdress(raw, msg.text_id, elapsed_ms) if raw is not None else None
            if decision is None:
                noted = self._keys.get(msg.text_id, key)
                _put(self._keys, msg.text_id, key if noted == key else None, self.settings.gateway_decisions_kept)
            else:
                found.append(decision)
                _put(self._served, msg.text_id, None, self.settings.gateway_decisions_kept)
        telemetry.CACHE_LOOKUPS.labels("hit").inc(len(found))
        telemetry.CACHE_LOOKUPS.labels("miss").inc(len(msgs) - len(found))
        return found

    async def store(self, decisions: Sequence[Decision]) -> None:
        """Keep the complete decisions, made by the versions in force, of texts this gateway looked up."""
        if not self.active:
            return
        assert self._redis is not None and self.versions is not None
        current = f"{self.prefix}:{self.versions.digest}:"
        rows: list[tuple[str, str]] = []
        for decision in decisions:
            if decision.text_id not in self._keys:  # another gateway's text, or one answered from the cache
                continue
            key = self._keys.pop(decision.text_id)
            if key is None:
                telemetry.CACHE_WRITES.labels("ambiguous").inc()
            elif decision.missing_voters or decision.path == "no_votes":
                telemetry.CACHE_WRITES.labels("incomplete").inc()
            elif not key.startswith(current) or not self.versions.made(decision):
                telemetry.CACHE_WRITES.labels("stale").inc()
            else:
                rows.append((key, decision.model_dump_json()))
        if not rows:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in rows:
                    pipe.set(key, value, ex=self.settings.gateway_cache_ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._trouble("store", exc)
            return
        telemetry.CACHE_WRITES.labels("stored").inc(len(rows))

    def served(self, text_id: str) -> bool:
        """Whether the decision for `text_id` came from the cache."""
        return text_id in self._served

    async def on_models(self, msgs: list[ModelPublished]) -> list[Event]:
        """The prediction cache: key texts by the published versions, delete the entries made by other ones."""
        if self._redis is None:
            return []
        # the services refuse the announcements the gate refuses, and keep their bundle: so does the cache
        admitted = await self.announcements.admit(msgs)
        for msg, path in admitted:
            self._switch(path, msg.component, msg.version)
        if not admitted:
            return []
        if self._purge is not None:  # a purge for an earlier announcement would keep that version's entries
            self._purge.cancel()
        self._purge = asyncio.create_task(self.purge(), name="gateway-cache-purge")
        return []

    def _switch(self, path: Path, component: str, version: str | None) -> None:
        try:
            if component == "bundle":
                self.versions = Versions.of(path)
            elif self.versions is not None and version is not None:
                self.versions = replace(self.versions, components={**self.versions.components, component: version})
        except (ArtifactError, OSError, ValueError) as exc:
            self.versions = None
            log.error("gateway: prediction cache idle until a readable bundle is published: %s", exc)
            return
        if self.versions is not None:
            log.info("gateway: prediction cache on %s for bundle %s", self.url, self.versions.bundle)

    async def purge(self) -> int:
        """Delete the entries made by versions other than those in force; how many were deleted."""
        if self._redis is None:
            return 0
        keep = f"{self.prefix}:{self.versions.digest}:".encode() if self.versions else None
        deleted = 0
        batch: list[bytes] = []
        try:
            async for key in self._redis.scan_iter(match=f"{self.prefix}:*", count=PURGE_BATCH):
                if keep is None or not key.startswith(keep):
                    batch.append(key)
                if len(batch) >= PURGE_BATCH:
                    deleted += await self._redis.unlink(*batch)
                    batch.clear()
            if batch:
                deleted += await self._redis.unlink(*batch)
        except (RedisError, OSError) as exc:
            self._trouble("purge", exc)
        log.info("gateway: prediction cache dropped %d entries of earlier models", deleted)
        return deleted

    def _trouble(self, what: str, exc: Exception) -> None:
        if time.monotonic() - self._warned_at > 60:  # once a minute, not once a request
            self._warned_at = time.monotonic()
            log.warning("gateway: prediction cache %s failed (answering without it): %s", what, exc)


def _put(into: OrderedDict[str, V], key: str, value: V, limit: int) -> None:
    """Remember `key` as the newest entry, forgetting the oldest beyond `limit`."""
    into[key] = value
    into.move_to_end(key)
    while len(into) > limit:
        into.popitem(last=False)


def _readdress(raw: bytes | str, text_id: str, latency_ms: float) -> Decision | None:
    """A cached decision as the decision for `text_id` (its votes too), answered now; None if unreadable."""
    try:
        cached = Decision.model_validate_json(raw)
    except ValidationError:
        return None  # an entry of an older schema: a miss, overwritten once decided again
    votes = [
        v.model_copy(update={"text_id": text_id, "message_id": Vote.id_for(text_id, v.voter)}) for v in cached.votes
    ]
    return cached.model_copy(
        update={
            "text_id": text_id,
            "message_id": Decision.id_for(text_id),
            "timestamp": utcnow(),
            "votes": votes,
            "latency_ms": latency_ms,
        }
    )
