"""What a voter core returns for one text, before it becomes a `Vote` on the bus."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from flockwatch.common.events import SafetyTrigger, TextSubmitted, Vote
from numpy.typing import NDArray


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
        submitted_at=msg.timestamp,
    )


def opinions_matrix(opinions: Sequence[Opinion | None], classes: Sequence[str]) -> NDArray[np.float64]:
    """(n, k) probabilities in `classes` order; NaN rows where the voter abstained or was not asked (None)."""
    out = np.full((len(opinions), len(classes)), np.nan)
    for i, op in enumerate(opinions):
        if op is not None and op.probabilities is not None:
            out[i] = [op.probabilities.get(c, 0.0) for c in classes]
    return out
