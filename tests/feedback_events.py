"""Builders for the feedback tests: decisions with votes, texts and feedback messages."""

from __future__ import annotations

from flockwatch.common.events import Decision, FeedbackSubmitted, TextSubmitted, Vote


def vote(text_id: str, voter: str, probs: dict[str, float] | None, evidence: tuple[str, ...] = ()) -> Vote:
    """A vote (None probabilities: an abstention)."""
    return Vote(
        message_id=Vote.id_for(text_id, voter),
        text_id=text_id,
        voter=voter,
        model_version="v1",
        probabilities=probs,
        abstain=probs is None,
        abstain_reason=None if probs else "no rule matched",
        evidence=list(evidence),
        latency_ms=1.0,
    )


def decision(
    text_id: str,
    prediction: str | None,
    votes: list[Vote],
    *,
    confidence: float = 0.95,
    prediction_set: list[str] | None = None,
    abstain: bool | None = None,
) -> Decision:
    """A decision; abstains when there is no prediction unless told otherwise."""
    abstain = prediction is None if abstain is None else abstain
    return Decision(
        message_id=Decision.id_for(text_id),
        text_id=text_id,
        prediction=prediction,
        confidence=confidence,
        abstain=abstain,
        abstain_reason="set has two classes" if abstain else None,
        prediction_set=prediction_set if prediction_set is not None else ([prediction] if prediction else []),
        probabilities={},
        path="combiner",
        votes=votes,
        arbiter_version="a1",
        thresholds={"answer": 0.9},
        latency_ms=5.0,
    )


def text(text_id: str, body: str) -> TextSubmitted:
    """A submitted text."""
    return TextSubmitted(message_id=f"text:{text_id}", text_id=text_id, text=body)


def feedback(
    feedback_id: str, text_id: str, reviewer: str, label: str | None = None, thumbs: str | None = None
) -> FeedbackSubmitted:
    """A correction (label) or a thumbs up/down."""
    return FeedbackSubmitted(
        message_id=feedback_id,
        text_id=text_id,
        reviewer_id=reviewer,
        label=label,
        thumbs=thumbs,  # type: ignore[arg-type]
    )
