"""Settings shared by every service (environment variables prefixed `FLOCKWATCH_`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUS_SCHEMES = ("memory", "kafka", "redis", "rediss", "nats")


def default_instance_id() -> str:
    """Host and process id: unique per running service instance."""
    return f"{socket.gethostname()}-{os.getpid()}"


class CommonSettings(BaseSettings):
    """Base settings; each service subclasses it with its own env prefix for its own fields."""

    model_config = SettingsConfigDict(env_prefix="FLOCKWATCH_", env_file=".env", extra="ignore")

    bus_url: str = Field("memory://", description="memory:// | kafka://host:port | redis://… | nats://…")
    instance_id: str = Field(default_factory=default_instance_id, description="Unique per instance.")
    model_dir: Path = Field(Path("models/sms/current"), description="The model bundle the services load.")
    batch_max: int = Field(256, ge=1, le=10_000, description="Most messages a handler takes at once.")
    batch_wait_ms: int = Field(3, ge=0, le=1_000, description="Longest a batch waits to fill.")
    dedupe_window: int = Field(100_000, ge=0, description="Message ids remembered to drop redeliveries.")
    kafka_session_timeout_ms: int = Field(
        6_000,
        ge=1_000,
        le=300_000,
        description="Kafka: a consumer that dies without leaving keeps its partitions this long "
        "(stock brokers accept ≥ 6000; the dev broker Tansu also lower, and pauses each join half as long).",
    )
    kafka_fetch_wait_ms: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Kafka: longest the broker holds a fetch while no data comes; Kafka answers as soon as data "
        "arrives, so this only bounds idle polling; Tansu answers multi-partition fetches only then (use 5).",
    )
    state_url: str | None = Field(
        None, description="Redis URL for shared state (arbiter joins, decisions); default: the bus if Redis."
    )
    log_level: str = "INFO"

    @field_validator("bus_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = url.split("://", 1)[0]
        if "://" not in url or scheme not in BUS_SCHEMES:
            raise ValueError(f"bus_url must start with one of {', '.join(s + '://' for s in BUS_SCHEMES)}")
        return url

    @property
    def bus_scheme(self) -> str:
        """The bus kind: memory, kafka, redis or nats."""
        scheme = self.bus_url.split("://", 1)[0]
        return "redis" if scheme == "rediss" else scheme

    @property
    def shared_state_url(self) -> str | None:
        """Where state shared by instances lives: `state_url`, or the Redis bus itself."""
        if self.state_url:
            return self.state_url
        return self.bus_url if self.bus_scheme == "redis" else None
