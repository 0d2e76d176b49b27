"""Gateway settings: environment variables `FLOCKWATCH_GATEWAY_*`, plus the common `FLOCKWATCH_*` ones."""

from typing import Literal

from flockwatch.common.settings import CommonSettings
from pydantic import Field


class GatewaySettings(CommonSettings):
    """HTTP limits, admission control and how long `POST /predict` waits."""

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8000, ge=0, le=65535)
    gateway_max_text_chars: int = Field(10_000, ge=1, description="Longer texts are refused with 413.")
    gateway_max_body_bytes: int = Field(1_000_000, ge=1, description="Larger request bodies are refused with 413.")
    gateway_max_in_flight: int = Field(2_000, ge=1, description="Texts waiting for a decision; beyond, 503.")
    gateway_ready_stall_s: float = Field(
        10.0, gt=0, description="GET /health/ready fails while a text in flight has waited longer than this."
    )
    gateway_max_in_flight_per_tenant: int = Field(
        1_000,
        ge=0,
        description="Texts one token may have waiting for a decision; beyond, 429 (so no client can hold admission "
        "for everyone). 0: off; with auth off there is one tenant and only the global limit.",
    )
    gateway_shed_after_ms: int = Field(
        400,
        ge=0,
        description="While a text in flight has waited longer than this, new texts are refused (503): the pipeline "
        "is behind. Keep it below the arbiter's deadline, or overload turns into decisions missing votes. 0: off.",
    )
    gateway_predict_timeout_ms: int = Field(5_000, ge=1, description="POST /predict gives up (504) after this.")
    gateway_decisions_kept: int = Field(100_000, ge=1, description="Decisions remembered for GET /decisions/{id}.")
    gateway_cache: bool = Field(True, description="Answer repeated texts from the Redis prediction cache (if Redis).")
    gateway_cache_url: str | None = Field(None, description="Redis for the cache; default: the shared state Redis.")
    gateway_cache_ttl_s: int = Field(86_400, ge=1, description="A cached decision is kept this long (seconds).")
    gateway_cache_prefix: str = Field("flockwatch:cache", min_length=1, description="Key prefix of cached decisions.")
    gateway_archive: bool = Field(
        True, description="Keep decisions in Redis (if any), so GET /decisions/{id} answers after a restart."
    )
    gateway_archive_url: str | None = Field(None, description="Redis for the archive; default: the cache's Redis.")
    gateway_archive_ttl_s: int = Field(86_400, ge=1, description="An archived decision is kept this long (seconds).")
    gateway_cache_scope: Literal["tenant", "shared"] = Field(
        "tenant",
        description="tenant: each token's texts are cached apart, so a hit (its flag, its latency) never tells one "
        "tenant what another sent; shared: one cache for all (more hits, but a cross-tenant oracle). Auth off: one.",
    )
