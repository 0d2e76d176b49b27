"""Arbiter settings: environment variables `FLOCKWATCH_ARBITER_*`, plus the common `FLOCKWATCH_*` ones."""

from flockwatch.common.settings import CommonSettings
from pydantic import Field


class ArbiterSettings(CommonSettings):
    """How long the arbiter waits for votes, and how often it checks deadlines."""

    arbiter_deadline_ms: int = Field(
        500, ge=1, le=600_000, description="Decide with the votes that arrived this long after submission."
    )
    arbiter_tick_ms: int = Field(10, ge=1, le=10_000, description="How often expired joins are looked for.")
    arbiter_cascade: bool = Field(
        True, description="Ask the cascade voters (the LLM) about unsure texts when the bundle's policy has them."
    )
