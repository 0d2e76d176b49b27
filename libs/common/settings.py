"""Settings shared by every service (environment variables prefixed `FLOCKWATCH_`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal, Self

from flockwatch.common.tokens import valid_rate
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories besides MODEL_DIR's models root whose bundles an announcement may name "
        "(comma-separated); a bundle anywhere else is refused.",
    )
    bundle_key: SecretStr | None = Field(
        None,
        description="Shared key of the HMAC-SHA256 that signs model announcements (ModelPublished); set: unsigned "
        "or wrongly signed announcements are refused. Unset: any bus writer can announce a bundle (warned at start).",
    )
    bus_key: SecretStr | None = Field(
        None,
        description="Shared key of the HMAC-SHA256 every bus message carries (header fw-sig); set: consumers "
        "dead-letter unsigned or wrongly signed messages. Unset: any broker writer can inject messages (warned).",
    )
    batch_max: int = Field(256, ge=1, le=10_000, description="Most messages a handler takes at once.")
    batch_wait_ms: int = Field(
        5,
        ge=0,
        le=1_000,
        description="Under load (at least two texts expected per this many ms), how long a consumer waits after a "
        "batch for the next to fill; at low load it does not wait. 0: never.",
    )
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
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None,
        description="Kafka: authenticate to the broker with SASL (needs KAFKA_USERNAME and KAFKA_PASSWORD); unset: "
        "no authentication (a broker reachable by others then takes anyone's messages, signed or not).",
    )
    kafka_username: str | None = Field(None, description="Kafka: the SASL user.")
    kafka_password: SecretStr | None = Field(None, description="Kafka: the SASL user's password.")
    kafka_tls: bool = Field(
        False,
        description="Kafka: connect over TLS (SASL_SSL with a mechanism, else SSL), verifying the broker's "
        "certificate against KAFKA_CA_FILE or the system's CAs. Without it SASL runs in the clear (SASL_PLAINTEXT): "
        "PLAIN then sends the password readable on the wire; use it only on a private network.",
    )
    kafka_ca_file: Path | None = Field(
        None, description="Kafka with TLS: the CA bundle (PEM) the broker's is signed by."
    )
    state_url: str | None = Field(
        None, description="Redis URL for shared state (arbiter joins, decisions); default: the bus if Redis."
    )
    publish_retry_s: float = Field(
        15.0,
        ge=0,
        le=600,
        description="Retry a publish (exponential backoff) this long while the broker is unreachable (a restart).",
    )
    redis_claim_idle_ms: int = Field(
        30_000,
        ge=0,
        le=3_600_000,
        description="Redis: a work group's entries read but not acknowledged this long (their consumer died, or "
        "its batch failed) are claimed by a live instance and handled again (XAUTOCLAIM); 0: never. Keep it above "
        "the slowest batch's handling time, or a slow batch is handled twice.",
    )
    max_message_bytes: int = Field(
        1_048_576, ge=65_536, description="Larger messages go to the dead-letter topic unparsed."
    )
    # HTTP APIs (libs/common/auth.py): tokens, rate limits, CORS
    auth_tokens_file: Path | None = Field(
        None, description="YAML of hashed API tokens (`flockwatch token create`); set: every API route needs one."
    )
    auth_required: bool = Field(False, description="Refuse to start an HTTP API without a token file (production).")
    rate_limit: str | None = Field(
        "600/minute", description="Requests per token (moving window), e.g. 100/minute, 20/second; empty: off."
    )
    rate_limit_url: str | None = Field(
        None, description="Redis for the rate-limit counters; default: the shared state Redis, else in memory."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the APIs from a browser (comma-separated); none: no CORS headers at all.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="The services' log level (`flockwatch serve`); any case."
    )
    tracing: Literal["off", "console", "otlp"] = Field(
        "off", description="OpenTelemetry spans: off (no cost), console (stdout, for dev) or otlp (OTLP over HTTP)."
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector base URL (e.g. http://jaeger:4318); default: OTEL_EXPORTER_OTLP_ENDPOINT "
        "or http://localhost:4318.",
    )
    tracing_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of texts traced (decided at the gateway; later hops follow)."
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65_535, description="Bus-only services: serve Prometheus /metrics on this port; off when unset."
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics port listens on (0.0.0.0 in containers).")

    lag_interval_s: float = Field(
        0.0, ge=0, description="How often a service reads its consumer groups' lag (Redis, Kafka, NATS); 0: never."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as JSON (one object a line, with the trace and span ids)."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        return valid_rate(value.strip() or None) if isinstance(value, str) else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        return [o.strip() for o in value.split(",") if o.strip()] if isinstance(value, str) else value

    @field_validator("model_roots", mode="before")
    @classmethod
    def _roots(cls, value: object) -> object:
        return [r.strip() for r in value.split(",") if r.strip()] if isinstance(value, str) else value

    @field_validator("bus_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = url.split("://", 1)[0]
        if "://" not in url or scheme not in BUS_SCHEMES:
            raise ValueError(f"bus_url must start with one of {', '.join(s + '://' for s in BUS_SCHEMES)}")
        return url

    @model_validator(mode="after")
    def _kafka_credentials(self) -> Self:
        given = [self.kafka_username is not None, self.kafka_password is not None]
        if self.kafka_sasl_mechanism and not all(given):
            raise ValueError("kafka_sasl_mechanism needs kafka_username and kafka_password")
        if any(given) and not self.kafka_sasl_mechanism:
            raise ValueError(
                "kafka_username/kafka_password given without kafka_sasl_mechanism (PLAIN, SCRAM-SHA-256, …)"
            )
        if self.kafka_ca_file is not None and not self.kafka_tls:
            raise ValueError("kafka_ca_file is for TLS: set kafka_tls=true too")
        return self

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
