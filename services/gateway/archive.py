"""Decisions kept in Redis, so `GET /decisions/{id}` still answers after the gateway restarts (or from another
gateway than the one that took the text). Keys are the bus ids (with auth on, `<token name>/<text_id>`), so a
tenant reads back only its own. Off without a Redis; an outage makes reads misses and writes skipped, never
errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from flockwatch.common.events import Decision
from flockwatch.gateway.settings import GatewaySettings
from pydantic import ValidationError
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
REDIS_TIMEOUT_S = 0.5


class DecisionArchive:
    """`keep` every decision the gateway sees for `gateway_archive_ttl_s`; `get` one back by its bus id."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        url = settings.gateway_archive_url or settings.gateway_cache_url or settings.shared_state_url
        self.url = url if settings.gateway_archive else None
        self.prefix = f"{settings.gateway_cache_prefix.rsplit(':', 1)[0]}:decision"
        self._redis: aioredis.Redis | None = None
        self._warned_at = 0.0

    async def __aenter__(self) -> DecisionArchive:
        if self.url is not None:
            self._redis = aioredis.from_url(
                self.url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def keep(self, decisions: Sequence[Decision]) -> None:
        """Store decisions (one pipelined round trip)."""
        if self._redis is None or not decisions:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for d in decisions:
                    pipe.set(f"{self.prefix}:{d.text_id}", d.model_dump_json(), ex=self.settings.gateway_archive_ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._trouble("write", exc)

    async def get(self, text_id: str) -> Decision | None:
        """The archived decision of a bus id, if any."""
        if self._redis is None:
            return None
        try:
            raw = await self._redis.get(f"{self.prefix}:{text_id}")
            return Decision.model_validate_json(raw) if raw is not None else None
        except (RedisError, OSError) as exc:
            self._trouble("read", exc)
        except ValidationError as exc:  # written by another version of the schema
            log.warning("gateway: archived decision of %s unreadable: %s", text_id, exc)
        return None

    def _trouble(self, what: str, exc: Exception) -> None:
        if time.monotonic() - self._warned_at > 60:  # once a minute, not once a request
            self._warned_at = time.monotonic()
            log.warning("gateway: decision archive %s failed (kept in memory only): %s", what, exc)
