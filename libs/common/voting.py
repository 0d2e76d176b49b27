"""What a voter core returns for one text, before it becomes a `Vote` on the bus."""

from __future__ import annotations

from dataclasses import dataclass, field

from flockwatch.common.events import SafetyTrigger, TextSubmitted, Vote


@dataclass(frozen=True)
class Opinion:
    """Class probabilities, or an abstention with its reason; plus safety triggers and evidence."""

    probabilities: dict[str, float] | None
    abstain_reason: str | None = None
    safety: tuple[SafetyTrigger, ...] = ()
    evidence: tuple[str, ...] = field(default=())

    @property
    def abstains(self) -> bool:
        """True when the voter has no opinion on the classes."""
        return self.probabilities is None


def to_vote(msg: TextSubmitted, voter: str, version: str, opinion: Opinion, latency_ms: float) -> Vote:
    """Wrap a core's opinion on a submitted text into a `Vote` with a deterministic id."""
    return Vote(
        message_id=Vote.id_for(msg.text_id, voter),
        text_id=msg.text_id,
        voter=voter,
        model_version=version,
        probabilities=opinion.probabilities,
        abstain=opinion.abstains,
        abstain_reason=opinion.abstain_reason,
        safety=list(opinion.safety),
        evidence=list(opinion.evidence),
        latency_ms=latency_ms,
    )
