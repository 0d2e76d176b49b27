"""The arbiter's policy: combine a text's votes, cut a conformal set, answer, abstain or escalate to the LLM.

A text is answered when its conformal prediction set is a single class and its confidence clears the
risk-controlled threshold (`risk.py`); safety triggers can raise the answer or force a review. When the
cascade voters (the LLM) have not voted and the cheap voters are unsure — their set is not a single
class, or their confidence is below `escalate_below` (where the cheap-only policy would abstain) — but
not hopeless (confidence ≥ `escalate_at`), the arbiter asks for the cascade vote instead of deciding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flockwatch.arbiter.combiner import NO_VOTES, PATHS, Combined, combine
from flockwatch.arbiter.config import ConformalConfig
from flockwatch.arbiter.conformal import MondrianSets
from flockwatch.arbiter.stacker import Array, Stacker, stack_votes
from flockwatch.common.events import Decision, SafetyTrigger, Vote
from flockwatch.common.labels import LabelConfig
from flockwatch.common.slices import SliceConfig

FORMAT = "flockwatch.arbiter.policy/2"
CHEAP, FULL = "cheap", "full"  # conformal calibrators: without and with the cascade (LLM) votes


class PolicyFormatError(ValueError):
    """A serialized policy cannot be read, or its parts do not fit together."""


def harm_weights(labels: LabelConfig) -> dict[str, float]:
    """The harm weight of each class, in the configured class order."""
    return {spec.name: spec.harm for spec in labels.labels}


def memberships(
    slices: SliceConfig | None, texts: Sequence[str | None], metadata: Sequence[Mapping[str, str]] | None = None
) -> list[list[str] | None]:
    """Slice names of each text (None when the text is unknown: the pooled calibrator serves it)."""
    if slices is None:
        return [[] for _ in texts]
    meta = metadata if metadata is not None else [{}] * len(texts)
    return [
        None if t is None else [s.name for s in slices.slices if s.contains(t, dict(m))]
        for t, m in zip(texts, meta, strict=True)
    ]


@dataclass
class DecideItem:
    """One text ready for decision: its votes, and what the arbiter knows about it."""

    text_id: str
    votes: Sequence[Vote]
    text: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    latency_ms: float = 0.0
    may_escalate: bool = True
    escalated: bool = False  # the cascade voters were asked (their votes may not have come)


@dataclass(frozen=True)
class Escalation:
    """The cheap voters were unsure: ask the cascade voters, then decide."""

    text_id: str
    voters: list[str]
    reason: str


@dataclass(eq=False)
class ArbiterPolicy:
    """Everything the arbiter needs to decide: classes, harm, stacker, conformal sets and thresholds."""

    classes: list[str]
    harm: dict[str, float]
    stacker: Stacker
    expected_voters: list[str]
    config: ConformalConfig
    sets: dict[str, MondrianSets]
    slices: SliceConfig | None = None
    answer_at: float = 0.0
    escalate_at: float = 2.0
    escalate_below: float = 2.0
    version: str = "0"
    calibration_report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if list(self.harm) != self.classes:
            raise PolicyFormatError(f"harm weights {list(self.harm)} do not match classes {self.classes}")
        if self.stacker.n_classes_ != len(self.classes):
            raise PolicyFormatError(f"stacker has {self.stacker.n_classes_} classes, policy {len(self.classes)}")
        if CHEAP not in self.sets:
            raise PolicyFormatError("the conformal calibrators lack the 'cheap' stage")
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._slot = {v: j for j, v in enumerate(self.stacker.voters_)}
        self._harm = np.array([self.harm[c] for c in self.classes])
        self._cascade = [v for v in self.config.cascade.voters if v in self._slot]

    @property
    def cascade_voters(self) -> list[str]:
        """The expensive voters the stacker knows (asked only on escalation)."""
        return list(self._cascade)

    @property
    def first_stage_voters(self) -> list[str]:
        """The voters a text waits for before its first decision."""
        return [v for v in self.expected_voters if v not in self._cascade]

    @property
    def thresholds(self) -> dict[str, float]:
        """The thresholds in force, as recorded in each decision."""
        return {
            "alpha": self.config.alpha,
            "answer_at": self.answer_at,
            "escalate_at": self.escalate_at,
            "escalate_below": self.escalate_below,
            "risk_target": self.config.risk.target,
            "consensus_min_prob": self.config.consensus_min_prob,
        }

    def combine_arrays(self, voter_probs: Mapping[str, Array], consensus: bool = True) -> Combined:
        """`combine` on per-voter (n, k) arrays with NaN rows for abstentions (what calibration uses)."""
        probs, present = stack_votes(self.stacker.voters_, voter_probs)
        return combine(self.stacker, probs, present, self.config.consensus_min_prob if consensus else None)

    def decide(self, votes: Sequence[Vote], text_id: str, latency_ms: float = 0.0, text: str | None = None) -> Decision:
        """One text's final decision (never an escalation)."""
        outcome = self.decide_many([DecideItem(text_id, votes, text, latency_ms=latency_ms, may_escalate=False)])[0]
        assert isinstance(outcome, Decision)
        return outcome

    def decide_many(self, items: Sequence[DecideItem]) -> list[Decision | Escalation]:
        """Decide (or escalate) a batch of texts with one vectorized combination."""
        if not items:
            return []
        n, m, k = len(items), len(self._slot), len(self.classes)
        probs, present = np.zeros((n, m, k)), np.zeros((n, m), dtype=bool)
        used, notes = [], []
        for i, item in enumerate(items):
            by_voter: dict[str, Vote] = {}
            for vote in item.votes:  # a redelivered vote repeats its voter: keep the first
                if vote.text_id == item.text_id:
                    by_voter.setdefault(vote.voter, vote)
            used.append(list(by_voter.values()))
            notes.append(self._fill_votes(used[-1], probs[i], present[i]))
        combined = combine(self.stacker, probs, present, self.config.consensus_min_prob)
        cascade_cols = [self._slot[v] for v in self._cascade]
        full = present[:, cascade_cols].any(axis=1) if cascade_cols else np.zeros(n, dtype=bool)
        groups = memberships(self.slices, [it.text for it in items], [it.metadata for it in items])
        p = np.nan_to_num(combined.probabilities)
        sets = np.ones((n, k), dtype=bool)
        for stage, rows in ((CHEAP, ~full), (FULL, full)):
            rows = rows & (combined.path != NO_VOTES)
            if rows.any():
                calibrator = self.sets.get(stage, self.sets[CHEAP])
                sets[rows] = calibrator.predict_sets(p[rows], [groups[i] for i in np.flatnonzero(rows)])
        out: list[Decision | Escalation] = []
        for i, item in enumerate(items):
            path = int(combined.path[i])
            escalate = self._escalation(item, path, p[i], sets[i], bool(full[i]))
            out.append(escalate or self._decision(item, used[i], notes[i], path, p[i], sets[i]))
        return out

    def _fill_votes(self, votes: list[Vote], probs: Array, present: Array) -> list[str]:
        notes = []
        for vote in votes:
            if vote.abstain or not vote.probabilities:
                notes.append(f"{vote.voter} abstained ({vote.abstain_reason})")
            elif (slot := self._slot.get(vote.voter)) is None:
                notes.append(f"{vote.voter} ignored (not in the stacker)")
            elif not self._fill(probs[slot], vote.probabilities):
                notes.append(f"{vote.voter} ignored (unknown classes or invalid probabilities)")
            else:
                present[slot] = True
        return notes

    def _fill(self, row: Array, probabilities: Mapping[str, float]) -> bool:
        """Write a vote's probabilities into `row`; False for unknown classes or values outside [0, 1]."""
        for name, p in probabilities.items():
            i = self._index.get(name)
            if i is None or not 0.0 <= p <= 1.0 + 1e-9:  # also rejects NaN, which Vote's sum check lets by
                row[:] = 0.0
                return False
            row[i] = min(p, 1.0)
        return True

    def _escalation(self, item: DecideItem, path: int, p: Array, pset: Array, full: bool) -> Escalation | None:
        if not (item.may_escalate and self._cascade and item.text) or full or path == NO_VOTES:
            return None
        confidence = float(p.max())
        sure = int(pset.sum()) == 1 and pset[int(p.argmax())] and confidence >= self.escalate_below
        if sure or confidence < self.escalate_at:
            return None
        why = f"cheap voters' set {self._names(pset)}, confidence {confidence:.3f}"
        return Escalation(item.text_id, list(self._cascade), why)

    def _names(self, pset: Array) -> list[str]:
        return [c for c, inside in zip(self.classes, pset, strict=True) if inside]

    def _decision(
        self, item: DecideItem, used: list[Vote], notes: list[str], path: int, p: Array, pset: Array
    ) -> Decision:
        arrived = {v.voter for v in used}
        escalated = item.escalated or bool(arrived & set(self._cascade))
        wanted = [*self.first_stage_voters, *(self._cascade if escalated else [])]
        absent = [v for v in wanted if v not in arrived]
        triggers = list(dict.fromkeys(t for v in used for t in v.safety))
        prediction, reason, applied = self._verdict(None if path == NO_VOTES else p, pset, triggers, absent, notes)
        return Decision(
            message_id=Decision.id_for(item.text_id),
            text_id=item.text_id,
            prediction=prediction,
            confidence=0.0 if path == NO_VOTES else float(p.max()),
            abstain=prediction is None,
            abstain_reason=reason,
            prediction_set=self._names(pset),
            probabilities={} if path == NO_VOTES else dict(zip(self.classes, p.tolist(), strict=True)),
            path=PATHS[path],
            votes=used,
            missing_voters=absent,
            safety_applied=applied,
            escalated=escalated,
            arbiter_version=self.version,
            thresholds=self.thresholds,
            latency_ms=item.latency_ms,
        )

    def _verdict(
        self, p: Array | None, pset: Array, triggers: list[SafetyTrigger], absent: list[str], notes: list[str]
    ) -> tuple[str | None, str | None, list[SafetyTrigger]]:
        reviews = [t for t in triggers if t.review]
        floors = [t for t in triggers if t.min_label is not None]
        unknown = [t for t in floors if t.min_label not in self._index]
        if reviews:
            return None, f"safety review: rule {', '.join(t.rule_id for t in reviews)}", reviews
        if unknown:  # a floor we cannot interpret must not be ignored: send the text to review
            rules = ", ".join(f"{t.rule_id} ({t.min_label})" for t in unknown)
            return None, f"safety floor names an unknown label: rule {rules}", unknown
        if p is None:
            details = "; ".join([*notes, *([f"missing: {', '.join(absent)}"] if absent else [])])
            return None, "no voter gave an opinion" + (f" ({details})" if details else ""), []
        level = f"{1 - self.config.alpha:.0%}"
        top, size = int(p.argmax()), int(pset.sum())
        if size == 0:
            return None, f"empty prediction set at {level}: no class is plausible", []
        if size > 1 or not pset[top]:
            return None, f"prediction set {self._names(pset)} at {level} is not a single class", []
        if p[top] < self.answer_at:
            target = f"{self.config.risk.target:.1%}"
            return None, f"confidence {p[top]:.3f} < {self.answer_at:.3f}, the threshold for ≤ {target} error", []
        binding = [t for t in floors if self.harm[str(t.min_label)] > self._harm[top]]
        if not binding:
            return self.classes[top], None, []
        floor = max(self.harm[str(t.min_label)] for t in binding)
        raised = int(np.argmax(np.where(self._harm >= floor, p, -1.0)))
        return self.classes[raised], None, binding

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the conformal calibrators are stored apart, as MAPIE objects)."""
        return {
            "format": FORMAT,
            "version": self.version,
            "classes": list(self.classes),
            "harm": {c: float(h) for c, h in self.harm.items()},
            "expected_voters": list(self.expected_voters),
            "config": self.config.model_dump(),
            "answer_at": self.answer_at,
            "escalate_at": self.escalate_at,
            "escalate_below": self.escalate_below,
            "stacker": self.stacker.to_dict(),
            "calibration_report": dict(self.calibration_report),
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], sets: dict[str, MondrianSets], slices: SliceConfig | None = None
    ) -> ArbiterPolicy:
        """Rebuild a policy from `to_dict()` output and its calibrators."""
        if data.get("format") != FORMAT:
            raise PolicyFormatError(f"not a serialized ArbiterPolicy: format {data.get('format')!r}")
        try:
            return cls(
                classes=[str(c) for c in data["classes"]],
                harm={str(c): float(h) for c, h in data["harm"].items()},
                stacker=Stacker.from_dict(data["stacker"]),
                expected_voters=[str(v) for v in data["expected_voters"]],
                config=ConformalConfig.model_validate(data["config"]),
                sets=sets,
                slices=slices,
                answer_at=float(data["answer_at"]),
                escalate_at=float(data["escalate_at"]),
                escalate_below=float(data["escalate_below"]),
                version=str(data["version"]),
                calibration_report=dict(data.get("calibration_report", {})),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PolicyFormatError(f"bad serialized ArbiterPolicy: {exc}") from exc
