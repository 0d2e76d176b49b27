"""Arbiter settings (environment prefix `FLOCKWATCH_ARBITER_`, plus the common `FLOCKWATCH_` ones)."""

from flockwatch.common.settings import CommonSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class ArbiterSettings(CommonSettings):
    """How long the arbiter waits for votes, and how often it checks deadlines."""

    model_config = SettingsConfigDict(env_prefix="FLOCKWATCH_ARBITER_", env_file=".env", extra="ignore")

    deadline_ms: int = Field(
        500, ge=1, le=600_000, description="Decide with the votes that arrived this long after submission."
    )
    tick_ms: int = Field(10, ge=1, le=10_000, description="How often expired joins are looked for.")
