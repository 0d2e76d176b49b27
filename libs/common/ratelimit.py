"""Rate limits per API token: a moving window (the `limits` library) kept in Redis, so every instance of every
HTTP service counts against the same budget; in process memory when no Redis is configured (each instance
then counts on its own). A Redis outage lets requests through (logged, counted) rather than refusing all."""

from __future__ import annotations

import logging
import math
import time

import redis.asyncio as aioredis
from flockwatch.common import telemetry
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

log = logging.getLogger(__name__)
KEY_PREFIX = "flockwatch:ratelimit"
REDIS_TIMEOUT_S = 0.5  # a slow Redis must not hold requests up: past this the request goes ahead, logged


class RateLimiter:
    """`hit(name, rate)`: None when the request may go ahead, else the seconds until the window lets one in."""

    def __init__(self, redis_url: str | None, default: str | None, key_prefix: str = KEY_PREFIX) -> None:
        self.default = default
        self._items: dict[str, RateLimitItem] = {}
        self._pool: aioredis.ConnectionPool | None = None
        self._warned_at = 0.0
        storage: MemoryStorage | RedisStorage
        if redis_url:
            self._pool = aioredis.ConnectionPool.from_url(
                redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
            scheme = redis_url.split("://", 1)[0]
            storage = RedisStorage(
                f"async+{scheme}://",
                implementation="redispy",
                key_prefix=key_prefix,
                wrap_exceptions=True,
                connection_pool=self._pool,  # type: ignore[arg-type]  # passed through to redis.asyncio.Redis
            )
        else:
            storage = MemoryStorage()
        self.where = "redis" if redis_url else "memory"
        self._limiter = MovingWindowRateLimiter(storage)

    def _item(self, rate: str | None) -> RateLimitItem | None:
        rate = rate or self.default
        if not rate:
            return None
        item = self._items.get(rate)
        if item is None:
            item = self._items[rate] = parse(rate)
        return item

    async def hit(self, name: str, rate: str | None = None) -> float | None:
        """Count one request for `name` under `rate` (default: the limiter's); seconds to wait if over it."""
        item = self._item(rate)
        if item is None:
            return None
        try:
            if await self._limiter.hit(item, name):
                return None
            stats = await self._limiter.get_window_stats(item, name)
        except (StorageError, OSError) as exc:
            telemetry.RATE_LIMIT_ERRORS.inc()
            if time.monotonic() - self._warned_at > 60:  # once a minute, not once a request
                self._warned_at = time.monotonic()
                log.warning("rate limit: storage unreachable, letting requests through: %s", exc)
            return None
        telemetry.RATE_LIMITED.labels(name).inc()
        return max(stats.reset_time - time.time(), 0.0)

    async def aclose(self) -> None:
        """Close the Redis connections."""
        if self._pool is not None:
            await self._pool.aclose()


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
