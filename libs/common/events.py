"""Messages on the bus: pydantic v2 models with a schema version, an idempotency id and a timestamp."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from flockwatch.common import topics
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

SCHEMA_VERSION: Literal[1] = 1

Label = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Event(BaseModel):
    """Fields every message carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Version of this message's schema.")
    message_id: str = Field(min_length=1, max_length=200, description="Idempotency key: handlers ignore repeats.")
    timestamp: datetime = Field(default_factory=utcnow, description="When the message was created (UTC).")

    TOPIC: ClassVar[str]

    @field_validator("timestamp")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        # a producer's timestamp without a time zone is UTC (the contract); naive and aware times never meet in
        # a handler (their difference raises TypeError)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @property
    def key(self) -> str:
        """The bus key (partitioning key): the text id where there is one."""
        return str(getattr(self, "text_id", self.message_id))


class TextSubmitted(Event):
    """A text to classify, published by the gateway."""

    TOPIC: ClassVar[str] = topics.TEXT_SUBMITTED

    text_id: str = Field(min_length=1, max_length=128, description="Id of the text; the bus key.")
    text: str = Field(min_length=1, description="The text itself.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Client metadata (source, language…).")


class SafetyTrigger(BaseModel):
    """A rule's demand on the final decision: at least a given label, or a human review."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule_id: str
    min_label: Label | None = Field(None, description="The decision may not be less harmful than this.")
    review: bool = Field(False, description="The decision must be an abstention sent to review.")


class Vote(Event):
    """One voter's opinion on one text: class probabilities, or an abstention with a reason."""

    TOPIC: ClassVar[str] = topics.VOTE_CAST

    text_id: str = Field(min_length=1, max_length=128)
    voter: str = Field(min_length=1, max_length=64, description="Name of the voter (one model of a service).")
    model_version: str = Field(description="Version of the model or rules that voted.")
    probabilities: dict[Label, float] | None = Field(None, description="Class probabilities, summing to 1.")
    abstain: bool = False
    abstain_reason: str | None = None
    safety: list[SafetyTrigger] = Field(default_factory=list, description="Safety triggers that fired.")
    evidence: list[str] = Field(default_factory=list, description="Why: e.g. the ids of the rules that fired.")
    latency_ms: float = Field(ge=0, description="Time the voter spent on this text (its batch share).")
    submitted_at: datetime | None = Field(
        None, description="When the text was submitted (or the vote asked for): tells how far behind the voter is."
    )

    @model_validator(mode="after")
    def _probabilities_or_abstain(self) -> Vote:
        if self.abstain:
            if not self.abstain_reason:
                raise ValueError("an abstaining vote needs an abstain_reason")
        elif not self.probabilities:
            raise ValueError("a vote that does not abstain needs probabilities")
        elif not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in self.probabilities.values()):
            raise ValueError("probabilities must be finite numbers in [0, 1]")
        elif abs(sum(self.probabilities.values()) - 1.0) > 1e-3:
            raise ValueError("probabilities must sum to 1")
        return self

    @staticmethod
    def id_for(text_id: str, voter: str) -> str:
        """Deterministic id: a redelivered text gives the same vote id."""
        return f"vote:{text_id}:{voter}"


class VoteRequested(Event):
    """The arbiter asks an expensive voter (the LLM) for its vote on a text the cheap voters were unsure of."""

    TOPIC: ClassVar[str] = topics.VOTE_REQUESTED

    text_id: str = Field(min_length=1, max_length=128)
    text: str = Field(min_length=1, description="The text, so the voter needs no other state.")
    voters: list[str] = Field(min_length=1, description="Which voters are asked (e.g. ['llm']).")
    reason: str = Field(description="Why the voters so far were not enough (their prediction set).")
    deadline_ms: float = Field(gt=0, description="How long the arbiter waits for the vote before deciding.")
    tier: int = Field(1, ge=1, description="The cascade round asked (1: the first tier after the cheap voters).")

    @staticmethod
    def id_for(text_id: str, tier: int = 1) -> str:
        """Deterministic id: one request per text and cascade round."""
        return f"request:{text_id}" if tier == 1 else f"request:{text_id}:{tier}"


class CascadeRound(BaseModel):
    """One round of the cost-ordered cascade as the arbiter saw it for a text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tier: int = Field(ge=0, description="0: the voters every text gets; r ≥ 1: the r-th cascade tier.")
    voters: list[str] = Field(description="The voters this round asked.")
    prediction_set: list[Label] = Field(description="The conformal set with the votes up to this round.")
    confidence: float = Field(ge=0, le=1)
    reason: str = Field(description="Why the cascade went on to the next tier, or stopped here.")


class Decision(Event):
    """The arbiter's answer for a text, with everything needed to reproduce it."""

    TOPIC: ClassVar[str] = topics.DECISION_MADE

    text_id: str = Field(min_length=1, max_length=128)
    prediction: Label | None = Field(None, description="The predicted class; None when abstaining.")
    confidence: float = Field(ge=0, le=1, description="Probability of the top class after combination.")
    abstain: bool
    abstain_reason: str | None = None
    prediction_set: list[Label] = Field(description="Conformal prediction set: covers the true class w.p. ≥ 1 − α.")
    probabilities: dict[Label, float] = Field(default_factory=dict, description="Combined probabilities.")
    path: Literal["consensus", "combiner", "no_votes"] = Field(description="Which arbiter path decided.")
    votes: list[Vote] = Field(description="The votes used, each with its voter's model/rules version.")
    missing_voters: list[str] = Field(default_factory=list, description="Expected voters that did not arrive.")
    safety_applied: list[SafetyTrigger] = Field(default_factory=list)
    escalated: bool = Field(False, description="The arbiter asked the expensive voters (the LLM) for this text.")
    rounds: list[CascadeRound] = Field(default_factory=list, description="The cascade rounds that ran, in order.")
    arbiter_version: str
    arbiter_instance: str | None = Field(None, description="Which arbiter instance decided.")
    thresholds: dict[str, float] = Field(description="The arbiter thresholds in force.")
    latency_ms: float = Field(ge=0, description="From submission to decision.")

    @staticmethod
    def id_for(text_id: str) -> str:
        """Deterministic id: exactly one decision per text."""
        return f"decision:{text_id}"


class FeedbackSubmitted(Event):
    """A human correction (true label) or a thumbs up/down for a decided text."""

    TOPIC: ClassVar[str] = topics.FEEDBACK_SUBMITTED

    text_id: str = Field(min_length=1, max_length=128)
    label: Label | None = Field(None, description="The true label, when the reviewer gives one.")
    thumbs: Literal["up", "down"] | None = None
    note: str | None = Field(None, max_length=2000)
    reviewer_id: str = Field(min_length=1, max_length=128)

    @model_validator(mode="after")
    def _label_or_thumbs(self) -> FeedbackSubmitted:
        if self.label is None and self.thumbs is None:
            raise ValueError("feedback needs a label or a thumbs up/down")
        return self


class ModelPublished(Event):
    """A new model version is ready; services that use the component reload it."""

    TOPIC: ClassVar[str] = topics.MODEL_PUBLISHED

    component: str = Field(description="Which component: a voter name, 'arbiter', or 'bundle'.")
    version: str
    path: str = Field(description="Artifact directory (shared volume or object-store path).")
    manifest_sha256: str
    metrics: dict[str, float] = Field(default_factory=dict)
    signature: str | None = Field(
        None,
        description="HMAC-SHA256 (hex) over message id, component, version, path and manifest sha256 with the key "
        "the services share (FLOCKWATCH_BUNDLE_KEY); services with a key refuse an announcement without it.",
    )


class DeadLetter(Event):
    """A message no handler could take, kept with the error so nothing is lost."""

    TOPIC: ClassVar[str] = topics.DEAD_LETTER

    topic: str
    consumer: str
    error: str
    payload: str = Field(description="The raw payload (UTF-8, invalid bytes replaced), maybe truncated.")
    payload_size: int = Field(ge=0, description="Size of the original payload in bytes.")
    truncated: bool = False
