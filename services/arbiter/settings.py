"""Arbiter settings: environment variables `FLOCKWATCH_ARBITER_*`, plus the common `FLOCKWATCH_*` ones."""

from flockwatch.common.settings import CommonSettings
from pydantic import Field


class ArbiterSettings(CommonSettings):
    """How long the arbiter waits for votes, and how often it checks deadlines."""

    arbiter_deadline_ms: int = Field(
        500,
        ge=1,
        le=600_000,
        description="Decide with the votes that arrived this long after the arbiter saw the text (or its first vote).",
    )
    arbiter_voter_silence_ms: int = Field(
        2_000,
        ge=1,
        le=600_000,
        description="A first-stage voter that cast no vote for this long while texts came is not waited for "
        "(it is down or hung) until it votes again; never less than the deadline.",
    )
    arbiter_max_extra_wait_ms: int = Field(
        3_000,
        ge=0,
        le=600_000,
        description="Deadlines wait up to this much longer while the voters are further behind the backlog than "
        "the arbiter (their median lag beyond its own); 0: never.",
    )
    arbiter_tick_ms: int = Field(
        10,
        ge=1,
        le=10_000,
        description="How often expired joins are looked for while a deadline is near (otherwise the loop sleeps "
        "until the earliest deadline, at most 100 ms).",
    )
    arbiter_lease_ms: int = Field(
        30_000,
        ge=100,
        le=3_600_000,
        description="A claimed text not confirmed (its decision published) within this is decided again.",
    )
    arbiter_cascade: bool = Field(
        True, description="Ask the cascade voters (the LLM) about unsure texts when the bundle's policy has them."
    )
