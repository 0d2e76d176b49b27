"""The feedback service's pure core: how much a decision needs a human, and what reviewers agreed on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Literal

from flockwatch.common.events import Decision

# A reviewer's disagreement (a conflict, a thumbs down, a flagged label) is the strongest signal there is.
HUMAN_DISAGREEMENT = 1.0


@dataclass(frozen=True)
class Assessment:
    """How much a decision needs review: disagreement in [0, 1] × the harm at stake = priority."""

    disagreement: float
    harm: float
    reasons: tuple[str, ...]

    @property
    def priority(self) -> float:
        """Disagreement × harm weight: the review queue's order."""
        return self.disagreement * self.harm

    @property
    def queued(self) -> bool:
        """True when at least one review criterion holds."""
        return bool(self.reasons)


def voter_outputs(decision: Decision) -> dict[str, dict[str, Any]]:
    """Each voter's output as JSON-ready data: top label, probabilities or abstention, evidence, version."""
    out: dict[str, dict[str, Any]] = {}
    for vote in decision.votes:
        probs = vote.probabilities or {}
        out[vote.voter] = {
            "top": max(probs, key=probs.__getitem__) if probs and not vote.abstain else None,
            "probabilities": probs if not vote.abstain else None,
            "abstain": vote.abstain,
            "abstain_reason": vote.abstain_reason,
            "evidence": list(vote.evidence),
            "version": vote.model_version,
        }
    return out


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """Total-variation distance between two class distributions (0 equal, 1 disjoint)."""
    keys = p.keys() | q.keys()
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def assess(decision: Decision, harm: Callable[[str], float], n_classes: int, min_set_size: int = 2) -> Assessment:
    """Disagreement of a decision (voters, abstention, set size; combined as a noisy-or) and its harm at stake.

    Voters: the mean pairwise total-variation distance of the voting voters' probabilities. Abstention:
    0.5 + 0.5 × (1 − confidence). Set: (|set| − 1) / (classes − 1). Harm: the largest harm weight among the
    classes in play (prediction, prediction set, each voter's top class).
    """
    votes = [v for v in decision.votes if not v.abstain and v.probabilities]
    tops = {max(v.probabilities, key=v.probabilities.__getitem__) for v in votes if v.probabilities}
    pairs = list(combinations([v.probabilities for v in votes if v.probabilities], 2))
    voters = sum(total_variation(p, q) for p, q in pairs) / len(pairs) if pairs else 0.0
    abstention = 0.5 + 0.5 * (1.0 - decision.confidence) if decision.abstain else 0.0
    set_size = len(decision.prediction_set)
    spread = (set_size - 1) / (n_classes - 1) if n_classes > 1 and set_size > 1 else 0.0
    reasons = []
    if len(tops) > 1:
        reasons.append(f"voters disagree ({', '.join(sorted(tops))})")
    if decision.abstain:
        reasons.append(f"arbiter abstained ({decision.abstain_reason or 'no reason given'})")
    if set_size >= min_set_size:
        reasons.append(f"prediction set of {set_size}")
    remaining = 1.0
    for part in (voters if len(tops) > 1 else 0.0, abstention, spread if set_size >= min_set_size else 0.0):
        remaining *= 1.0 - min(max(part, 0.0), 1.0)
    in_play = {*decision.prediction_set, *tops, *([decision.prediction] if decision.prediction else [])}
    return Assessment(round(1.0 - remaining, 6), max((harm(c) for c in in_play), default=1.0), tuple(reasons))


@dataclass(frozen=True)
class Correction:
    """One feedback row, reduced to what agreement needs; `label` is the effective label (thumbs up → the
    prediction), `down` a thumbs down without a label."""

    feedback_id: str
    seq: int
    text_id: str
    reviewer_id: str
    label: str | None
    down: bool = False
    flagged: bool = False


Status = Literal["resolved", "conflict", "flagged", "thumbs_down", "unlabelled"]


@dataclass(frozen=True)
class Resolution:
    """What the reviewers of one text (or of one group of duplicate texts) agree on."""

    status: Status
    label: str | None
    votes: dict[str, list[str]] = field(default_factory=dict)  # label → reviewers (latest, not flagged)
    flagged: tuple[str, ...] = ()  # feedback ids flagged as likely label errors
    downs: tuple[str, ...] = ()  # reviewers who gave a thumbs down
    latest_seq: int = 0

    @property
    def disputed(self) -> bool:
        """Different reviewers gave different labels (or a thumbs down against a label)."""
        return len(self.votes) > 1 or (bool(self.downs) and bool(self.votes))


def latest_per_reviewer(corrections: Iterable[Correction]) -> list[Correction]:
    """Each reviewer's newest correction: a reviewer who changes their mind replaces their earlier label."""
    latest: dict[str, Correction] = {}
    for c in sorted(corrections, key=lambda c: c.seq):
        latest[c.reviewer_id] = c
    return list(latest.values())


def resolve(corrections: Sequence[Correction]) -> Resolution:
    """A label when a strict majority of the (latest, unflagged) reviewers agree on it; else why not."""
    latest = latest_per_reviewer(corrections)
    votes: dict[str, list[str]] = {}
    for c in latest:
        if c.label is not None and not c.flagged:
            votes.setdefault(c.label, []).append(c.reviewer_id)
    downs = tuple(c.reviewer_id for c in latest if c.down and not c.flagged)
    flagged = tuple(c.feedback_id for c in latest if c.flagged)
    seq = max((c.seq for c in corrections), default=0)
    if not votes:
        status: Status = "flagged" if flagged else "thumbs_down" if downs else "unlabelled"
        return Resolution(status, None, votes, flagged, downs, seq)
    label, top = max(((lbl, len(rs)) for lbl, rs in votes.items()), key=lambda x: (x[1], x[0]))
    total = sum(len(rs) for rs in votes.values()) + len(downs)
    if top * 2 > total:
        return Resolution("resolved", label, votes, flagged, downs, seq)
    return Resolution("conflict", None, votes, flagged, downs, seq)


@dataclass
class ReviewerStats:
    """How often a reviewer agrees with the other reviewers of the same texts."""

    reviewer_id: str
    labels: int = 0
    flagged: int = 0
    overlap_texts: int = 0
    agreeing_pairs: int = 0
    pairs: int = 0
    agreement_with_model: float | None = None

    @property
    def agreement(self) -> float | None:
        """Observed pairwise agreement with other reviewers (None without overlap)."""
        return self.agreeing_pairs / self.pairs if self.pairs else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "reviewer_id": self.reviewer_id,
            "labels": self.labels,
            "flagged": self.flagged,
            "flag_rate": self.flagged / self.labels if self.labels else None,
            "overlap_texts": self.overlap_texts,
            "agreement": self.agreement,
            "agreement_with_model": self.agreement_with_model,
        }


def reviewer_agreement(
    groups: Iterable[Sequence[Correction]], predictions: dict[str, str | None] | None = None
) -> list[ReviewerStats]:
    """Per reviewer: labels given, flagged, and pairwise agreement with other reviewers on shared texts."""
    stats: dict[str, ReviewerStats] = {}
    with_model: dict[str, Counter[bool]] = {}
    predictions = predictions or {}
    for group in groups:
        latest = [c for c in latest_per_reviewer(group) if c.label is not None]
        for c in latest:
            s = stats.setdefault(c.reviewer_id, ReviewerStats(c.reviewer_id))
            s.labels += 1
            s.flagged += c.flagged
            predicted = predictions.get(c.text_id)
            if predicted is not None:
                with_model.setdefault(c.reviewer_id, Counter())[c.label == predicted] += 1
        for c in latest:
            others = [o for o in latest if o.reviewer_id != c.reviewer_id]
            if others:
                s = stats[c.reviewer_id]
                s.overlap_texts += 1
                s.pairs += len(others)
                s.agreeing_pairs += sum(o.label == c.label for o in others)
    for reviewer, counts in with_model.items():
        stats[reviewer].agreement_with_model = counts[True] / sum(counts.values())
    return sorted(stats.values(), key=lambda s: s.reviewer_id)
