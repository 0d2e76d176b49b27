"""HTTP request and response bodies of the gateway."""

from __future__ import annotations

from typing import Any

from flockwatch.common import problems
from flockwatch.common.events import Decision
from flockwatch.common.validtext import NO_NUL, NONSPACE_NO_NUL, ValidStrictStr
from pydantic import BaseModel, ConfigDict, Field


def _keys_without_nul(schema: dict[str, Any]) -> None:
    """Pydantic spells a key pattern as `patternProperties`, which lets every other key through unchecked."""
    (_, values), *_ = schema.pop("patternProperties").items()
    schema.update(propertyNames={"pattern": NO_NUL}, additionalProperties=values)


class PredictRequest(BaseModel):
    """A text to classify."""

    model_config = ConfigDict(extra="forbid")

    text: ValidStrictStr = Field(
        description="The text: valid Unicode without NUL, with a non-space character.",
        json_schema_extra={"pattern": NONSPACE_NO_NUL},  # documents the route's own check, which says what is wrong
    )
    text_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Your id for the text (your token's own: other tokens' ids never meet yours); a new one is made "
        "when omitted. An id names one text: reusing it for another text or metadata is refused (409).",
    )
    metadata: dict[ValidStrictStr, ValidStrictStr] = Field(
        default_factory=dict, description="E.g. source, language.", json_schema_extra=_keys_without_nul
    )


class VoterOutput(BaseModel):
    """One voter's part in a decision."""

    model_version: str
    probabilities: dict[str, float] | None
    abstain: bool
    abstain_reason: str | None = None
    evidence: list[str] = Field(default_factory=list)


class PredictResponse(BaseModel):
    """The decision for a text, with every voter's output."""

    text_id: str
    prediction: str | None
    confidence: float
    abstain: bool
    abstain_reason: str | None
    prediction_set: list[str]
    voter_outputs: dict[str, VoterOutput]
    missing_voters: list[str]
    path: str
    arbiter_version: str
    latency_ms: float
    cached: bool = Field(
        False, description="Answered from the prediction cache (same text and models decided before); not re-voted."
    )

    @classmethod
    def of(cls, decision: Decision, cached: bool = False, text_id: str | None = None) -> PredictResponse:
        """The response for a decision (under the caller's `text_id` when the bus knows it by a scoped one)."""
        return cls(
            text_id=text_id or decision.text_id,
            prediction=decision.prediction,
            confidence=decision.confidence,
            abstain=decision.abstain,
            abstain_reason=decision.abstain_reason,
            prediction_set=decision.prediction_set,
            voter_outputs={
                v.voter: VoterOutput(
                    model_version=v.model_version,
                    probabilities=v.probabilities,
                    abstain=v.abstain,
                    abstain_reason=v.abstain_reason,
                    evidence=v.evidence,
                )
                for v in decision.votes
            },
            missing_voters=decision.missing_voters,
            path=decision.path,
            arbiter_version=decision.arbiter_version,
            latency_ms=decision.latency_ms,
            cached=cached,
        )


class Accepted(BaseModel):
    """A text accepted for asynchronous classification."""

    text_id: str
    status_url: str


class PredictBatchRequest(BaseModel):
    """Several texts to classify together (admitted whole or not at all)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[PredictRequest] = Field(min_length=1, max_length=1000, description="1 to 1,000 texts.")


class PredictBatchResponse(BaseModel):
    """Decisions in request order; texts not decided within the timeout are listed as pending."""

    decisions: list[PredictResponse]
    pending: list[Accepted] = Field(default_factory=list, description="Poll each one's status URL.")


Problem = problems.Problem  # every error of every API: RFC 9457 (libs/common/problems.py)
