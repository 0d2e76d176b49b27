"""The arbiter's first-version policy: combine a text's votes, apply safety triggers, answer or abstain.

The math lives in `combiner.combine`, on (n, m, k) arrays: `decide` calls it with n = 1 and
`fit_policy` with the whole calibration split, so the abstention threshold is chosen on exactly the
decisions the service will make (safety triggers aside: calibration data carries none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flockwatch.arbiter.combiner import (
    CONSENSUS,
    NO_VOTES,
    PATHS,
    Array,
    Combined,
    LogLinearPool,
    ThresholdChoice,
    choose_abstain_threshold,
    combine,
    prediction_set_sizes,
    stack_votes,
)
from flockwatch.common.events import Decision, SafetyTrigger, Vote
from flockwatch.common.labels import LabelConfig
from numpy.typing import NDArray

FORMAT = "flockwatch.arbiter.policy/1"


class PolicyFormatError(ValueError):
    """A serialized policy cannot be read, or its parts do not fit together."""


def harm_weights(labels: LabelConfig) -> dict[str, float]:
    """The harm weight of each class, in the configured class order."""
    return {spec.name: spec.harm for spec in labels.labels}


@dataclass(eq=False)
class ArbiterPolicy:
    """Everything the arbiter needs to decide: classes, harm weights, the fitted pool and thresholds."""

    classes: list[str]
    harm: dict[str, float]
    pool: LogLinearPool
    expected_voters: list[str]
    consensus_min_prob: float = 0.9
    abstain_below: float = 0.0
    set_level: float = 0.9
    version: str = "0"
    calibration_report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if list(self.harm) != self.classes:
            raise PolicyFormatError(f"harm weights {list(self.harm)} do not match classes {self.classes}")
        if self.pool.n_classes_ != len(self.classes):
            raise PolicyFormatError(f"pool has {self.pool.n_classes_} classes, policy {len(self.classes)}")
        if not 0.5 < self.consensus_min_prob <= 1.0:  # > 0.5 makes the shared class the mean's top class
            raise PolicyFormatError(f"consensus_min_prob must be in (0.5, 1]; got {self.consensus_min_prob}")
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._slot = {v: j for j, v in enumerate(self.pool.voters_)}
        self._harm = np.array([self.harm[c] for c in self.classes])

    @property
    def thresholds(self) -> dict[str, float]:
        """The thresholds in force, as recorded in each decision."""
        return {
            "consensus_min_prob": self.consensus_min_prob,
            "abstain_below": self.abstain_below,
            "set_level": self.set_level,
        }

    def combine_arrays(self, voter_probs: Mapping[str, Array]) -> Combined:
        """`combine` on per-voter (n, k) arrays with NaN rows for abstentions (what calibration uses)."""
        return combine(self.pool, *stack_votes(self.pool.voters_, voter_probs), self.consensus_min_prob)

    def decide(
        self, votes: Sequence[Vote], text_id: str, latency_ms: float, missing: Sequence[str] | None = None
    ) -> Decision:
        """Join the votes of one text into a decision (or an abstention with its reason)."""
        by_voter: dict[str, Vote] = {}
        for vote in votes:  # a redelivered vote repeats its voter: keep the first
            if vote.text_id == text_id:
                by_voter.setdefault(vote.voter, vote)
        used = list(by_voter.values())
        probs = np.zeros((1, len(self._slot), len(self.classes)))
        present = np.zeros((1, len(self._slot)), dtype=bool)
        notes: list[str] = []
        for vote in used:
            if vote.abstain or not vote.probabilities:
                notes.append(f"{vote.voter} abstained ({vote.abstain_reason})")
            elif (slot := self._slot.get(vote.voter)) is None:
                notes.append(f"{vote.voter} ignored (not in the pool)")
            elif not self._fill(probs[0, slot], vote.probabilities):
                notes.append(f"{vote.voter} ignored (unknown classes or invalid probabilities)")
            else:
                present[0, slot] = True
        combined = combine(self.pool, probs, present, self.consensus_min_prob)
        arrived = {v.voter for v in used}
        absent = [v for v in dict.fromkeys([*self.expected_voters, *(missing or [])]) if v not in arrived]
        triggers = list(dict.fromkeys(t for v in used for t in v.safety))
        p, path = combined.probabilities[0], int(combined.path[0])
        verdict = self._verdict(p if path != NO_VOTES else None, triggers, absent, notes)
        return Decision(
            message_id=Decision.id_for(text_id),
            text_id=text_id,
            prediction=verdict.prediction,
            confidence=verdict.confidence,
            abstain=verdict.prediction is None,
            abstain_reason=verdict.reason,
            prediction_set=verdict.prediction_set,
            probabilities={} if path == NO_VOTES else dict(zip(self.classes, p.tolist(), strict=True)),
            path=PATHS[path],
            votes=used,
            missing_voters=absent,
            safety_applied=verdict.applied,
            arbiter_version=self.version,
            thresholds=self.thresholds,
            latency_ms=latency_ms,
        )

    def _fill(self, row: Array, probabilities: Mapping[str, float]) -> bool:
        """Write a vote's probabilities into `row`; False for unknown classes or values outside [0, 1]."""
        for name, p in probabilities.items():
            i = self._index.get(name)
            if i is None or not 0.0 <= p <= 1.0 + 1e-9:  # also rejects NaN, which Vote's sum check lets by
                row[:] = 0.0
                return False
            row[i] = min(p, 1.0)  # Vote allows sums off by 1e-3; Decision.confidence must stay ≤ 1
        return True

    def _verdict(self, p: Array | None, triggers: list[SafetyTrigger], absent: list[str], notes: list[str]) -> _Verdict:
        reviews = [t for t in triggers if t.review]
        floors = [t for t in triggers if t.min_label is not None]
        unknown = [t for t in floors if t.min_label not in self._index]
        if p is None:
            confidence, pset = 0.0, list(self.classes)
            details = "; ".join([*notes, *([f"missing: {', '.join(absent)}"] if absent else [])])
            reason = "no voter gave an opinion" + (f" ({details})" if details else "")
        else:
            order = np.argsort(-p, kind="stable")
            confidence = float(p[order[0]])
            pset = [self.classes[i] for i in order[: int(prediction_set_sizes(p[None], self.set_level)[0])]]
            reason = f"confidence {confidence:.2f} < threshold {self.abstain_below:.2f}"
        if reviews:
            rules = ", ".join(t.rule_id for t in reviews)
            return _Verdict(None, confidence, f"safety review: rule {rules}", pset, reviews)
        if unknown:  # a floor we cannot interpret must not be ignored: send the text to review
            rules = ", ".join(f"{t.rule_id} ({t.min_label})" for t in unknown)
            return _Verdict(None, confidence, f"safety floor names an unknown label: rule {rules}", pset, unknown)
        if p is None or confidence < self.abstain_below:
            return _Verdict(None, confidence, reason, pset, [])
        top = int(order[0])
        binding = [t for t in floors if self.harm[str(t.min_label)] > self._harm[top]]
        if not binding:
            return _Verdict(self.classes[top], confidence, None, pset, [])
        floor = max(self.harm[str(t.min_label)] for t in binding)
        raised = int(np.argmax(np.where(self._harm >= floor, p, -1.0)))
        return _Verdict(self.classes[raised], confidence, None, pset, binding)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict (no pickle): the artifact can be read and diffed."""
        return {
            "format": FORMAT,
            "version": self.version,
            "classes": list(self.classes),
            "harm": {c: float(h) for c, h in self.harm.items()},
            "expected_voters": list(self.expected_voters),
            "thresholds": self.thresholds,
            "pool": self.pool.to_dict(),
            "calibration_report": dict(self.calibration_report),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArbiterPolicy:
        """Rebuild a policy from `to_dict()` output."""
        if data.get("format") != FORMAT:
            raise PolicyFormatError(f"not a serialized ArbiterPolicy: format {data.get('format')!r}")
        try:
            return cls(
                classes=[str(c) for c in data["classes"]],
                harm={str(c): float(h) for c, h in data["harm"].items()},
                pool=LogLinearPool.from_dict(data["pool"]),
                expected_voters=[str(v) for v in data["expected_voters"]],
                version=str(data["version"]),
                calibration_report=dict(data.get("calibration_report", {})),
                **{k: float(v) for k, v in data["thresholds"].items()},
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PolicyFormatError(f"bad serialized ArbiterPolicy: {exc}") from exc


@dataclass(frozen=True)
class _Verdict:
    prediction: str | None
    confidence: float
    reason: str | None
    prediction_set: list[str]
    applied: list[SafetyTrigger]


def fit_policy(
    oof_votes: Mapping[str, Array],
    y_train: NDArray[np.integer[Any]],
    cal_votes: Mapping[str, Array],
    y_cal: NDArray[np.integer[Any]],
    classes: list[str],
    harm: Mapping[str, float],
    target_error: float = 0.05,
    *,
    min_coverage: float = 0.0,
    expected_voters: list[str] | None = None,
    consensus_min_prob: float = 0.9,
    set_level: float = 0.9,
    version: str = "1",
    pool: LogLinearPool | None = None,
) -> ArbiterPolicy:
    """Fit the pool on out-of-fold train probabilities, then pick `abstain_below` on the calibration split."""
    fitted = (pool if pool is not None else LogLinearPool()).fit(oof_votes, y_train)
    policy = ArbiterPolicy(
        classes=list(classes),
        harm={c: float(harm[c]) for c in classes},
        pool=fitted,
        expected_voters=list(expected_voters if expected_voters is not None else oof_votes),
        consensus_min_prob=consensus_min_prob,
        set_level=set_level,
        version=version,
    )
    combined = policy.combine_arrays(cal_votes)
    choice = choose_abstain_threshold(*_confidence_and_correct(combined, y_cal), target_error, min_coverage)
    policy.abstain_below = choice.threshold
    policy.calibration_report = _report(combined, np.asarray(y_cal), choice, target_error, set_level)
    return policy


def _confidence_and_correct(combined: Combined, y: NDArray[np.integer[Any]]) -> tuple[Array, NDArray[np.bool_]]:
    """Top-class probability (NaN where no voter gave an opinion: those rows always abstain) and hits."""
    voted = combined.path != NO_VOTES
    p = np.nan_to_num(combined.probabilities)
    return np.where(voted, p.max(axis=1), np.nan), voted & (p.argmax(axis=1) == np.asarray(y))


def _report(
    combined: Combined, y: NDArray[Any], choice: ThresholdChoice, target_error: float, set_level: float
) -> dict[str, Any]:
    confidence, correct = _confidence_and_correct(combined, y)
    voted, consensus = combined.path != NO_VOTES, combined.path == CONSENSUS
    p = np.nan_to_num(combined.probabilities[voted])
    sizes = prediction_set_sizes(p, set_level)
    rank = (p > p[np.arange(len(p)), y[voted], None]).sum(axis=1)  # classes strictly above the truth
    return {
        "n": len(y),
        "target_error": target_error,
        "threshold": choice.threshold,
        "coverage": choice.coverage,
        "error": choice.error,
        "met": choice.met,
        "no_votes_rate": float(1.0 - voted.mean()) if len(y) else 0.0,
        "consensus_rate": float(consensus.mean()) if len(y) else 0.0,
        "consensus_error": float(1.0 - correct[consensus].mean()) if consensus.any() else None,
        "set_level": set_level,
        "set_coverage": float((rank < sizes).mean()) if len(p) else None,
        "mean_set_size": float(sizes.mean()) if len(p) else None,
    }
