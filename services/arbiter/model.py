"""The arbiter's policy: combine a text's votes, cut a conformal set, answer, abstain or escalate.

A text is answered when its confidence clears the risk-controlled threshold λ (`risk.py`) and, when
`answer_requires_singleton` is set, its conformal prediction set is a single class; the set is reported
with every decision either way. Safety triggers can raise the answer or force a review. The cascade asks
its tiers in rounds, cheapest first (e.g. the embedding model, then the LLM): while a text cannot be
answered yet (confidence below `escalate_below`, the label-free estimate of λ, or a set the rule refuses)
but it is not hopeless (confidence ≥ that tier's `escalate_at`), the arbiter asks the next tier instead of
deciding.
Each decision records its rounds and why the cascade stopped.
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
from flockwatch.common.certification import certification
from flockwatch.common.events import CascadeRound, Decision, SafetyTrigger, Vote
from flockwatch.common.labels import LabelConfig
from flockwatch.common.slices import SliceConfig
from numpy.typing import NDArray

FORMAT = "flockwatch.arbiter.policy/3"
CHEAP = "cheap"  # the conformal calibrator of round 0 (no cascade votes); round r's is stage_name(r)


def stage_name(r: int) -> str:
    """The conformal calibrator's key for decisions made with the voters of rounds 0…r."""
    return CHEAP if r == 0 else f"tier{r}"


def active_tiers(config: ConformalConfig, known: Sequence[str]) -> list[tuple[list[str], float]]:
    """The cascade tiers (voters, budget) restricted to voters the stacker knows; empty tiers dropped."""
    tiers = [([v for v in t.voters if v in known], t.budget) for t in config.cascade.tiers]
    return [(voters, budget) for voters, budget in tiers if voters]


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
    rounds: int = 0  # cascade tiers already asked (their votes may not have come)


@dataclass(frozen=True)
class Escalation:
    """The voters so far were unsure: ask the next tier's voters, then decide."""

    text_id: str
    voters: list[str]
    reason: str
    tier: int = 1


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
    escalate_at: tuple[float, ...] = ()  # per tier; 2.0 (NEVER): the plan does not reach it
    escalate_below: float = 2.0
    version: str = "0"
    calibration_report: dict[str, Any] = field(default_factory=dict)
    # fitting only, never stored: the round-0 calibration probabilities, answered mask and labels
    calibration_scores: tuple[Array, NDArray[np.bool_], NDArray[np.int64]] | None = field(default=None, repr=False)

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
        self.tiers = [voters for voters, _ in active_tiers(self.config, self.stacker.voters_)]
        self.escalate_at = tuple(self.escalate_at) + (2.0,) * (len(self.tiers) - len(self.escalate_at))
        self._cascade = [v for tier in self.tiers for v in tier]
        self._first_stage = tuple(v for v in self.expected_voters if v not in self._cascade)
        # column masks of the voters each round may use (round 0: every voter outside the cascade)
        self._prefix = np.ones((len(self.tiers) + 1, len(self._slot)), dtype=bool)
        for r in range(len(self.tiers) + 1):
            for v in [v for tier in self.tiers[r:] for v in tier]:
                self._prefix[r, self._slot[v]] = False

    @property
    def certification(self) -> dict[str, Any]:
        """Whether the risk target was certified; when not, the policy abstains on every text and says so."""
        return certification(self.answer_at, self.config.risk.target, self.calibration_report.get("risk", {}))

    @property
    def cascade_voters(self) -> list[str]:
        """The expensive voters the stacker knows (asked only on escalation), cheapest tier first."""
        return list(self._cascade)

    @property
    def first_stage_voters(self) -> list[str]:
        """The voters a text waits for before its first decision."""
        return list(self._first_stage)

    @property
    def thresholds(self) -> dict[str, float]:
        """The thresholds in force, as recorded in each decision."""
        return {
            "alpha": self.config.alpha,
            "answer_at": self.answer_at,
            **{f"escalate_at_tier{r + 1}": tau for r, tau in enumerate(self.escalate_at)},
            "escalate_below": self.escalate_below,
            "risk_target": self.config.risk.target,
            # only when the consensus fast path is on
            **({} if (cmp := self.config.consensus_min_prob) is None else {"consensus_min_prob": cmp}),
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
        groups = memberships(self.slices, [it.text for it in items], [it.metadata for it in items])
        p, sets, path, stage = self._cut(probs, present, groups)
        out: list[Decision | Escalation] = []
        for i, item in enumerate(items):
            escalate = self._escalation(item, int(path[i]), p[i], sets[i])
            out.append(escalate or self._decision(item, used[i], notes[i], int(path[i]), p[i], sets[i]))
        traced = [i for i, o in enumerate(out) if isinstance(o, Decision)]
        if traced:
            seen = (p[traced], sets[traced], path[traced], stage[traced])  # what the decisions saw, all votes in
            rounds = self._rounds(
                [items[i] for i in traced], probs[traced], present[traced], [groups[i] for i in traced], seen
            )
            for i, trace in zip(traced, rounds, strict=True):
                decision = out[i]
                assert isinstance(decision, Decision)
                out[i] = decision.model_copy(update={"rounds": trace})
        return out

    def _stage(self, present: Array) -> NDArray[np.int64]:
        """The deepest cascade round with a vote present (0: only the every-text voters)."""
        stage = np.zeros(len(present), dtype=np.int64)
        for r, tier in enumerate(self.tiers, start=1):
            cols = [self._slot[v] for v in tier]
            stage[present[:, cols].any(axis=1)] = r
        return stage

    def _cut(
        self, probs: Array, present: Array, groups: list[list[str] | None]
    ) -> tuple[Array, NDArray[np.bool_], NDArray[np.int8], NDArray[np.int64]]:
        """Combined probabilities, conformal sets (by each text's round's calibrator), paths and rounds."""
        n, k = len(probs), len(self.classes)
        combined = combine(self.stacker, probs, present, self.config.consensus_min_prob)
        stage = self._stage(present)
        p = np.nan_to_num(combined.probabilities)
        sets = np.ones((n, k), dtype=bool)
        for r in np.unique(stage):
            rows = (stage == r) & (combined.path != NO_VOTES)
            if rows.any():
                calibrator = self.sets.get(stage_name(int(r)), self.sets[CHEAP])
                sets[rows] = calibrator.predict_sets(p[rows], [groups[i] for i in np.flatnonzero(rows)])
        return p, sets, combined.path, stage

    def _rounds(
        self,
        items: Sequence[DecideItem],
        probs: Array,
        present: Array,
        groups: list[list[str] | None],
        seen: tuple[Array, NDArray[np.bool_], NDArray[np.int8], NDArray[np.int64]],
    ) -> list[list[CascadeRound]]:
        """Each decision's rounds: what each round saw (recomputed from its votes, unless they are all the votes
        the decision saw: `seen`), why it went on or stopped."""
        last = [min(it.rounds, len(self.tiers)) for it in items]
        views = []
        for r in range(max(last) + 1):  # absent voters' rows must be zeros: the consensus path sums them
            mask = present & self._prefix[r]
            same = np.array_equal(mask, present)
            views.append(seen if same else self._cut(np.where(mask[:, :, None], probs, 0.0), mask, groups))
        out = []
        for i in range(len(items)):
            trace = []
            for r in range(last[i] + 1):
                p, sets, path, _ = (view[i] for view in views[r])
                voters = self.first_stage_voters if r == 0 else self.tiers[r - 1]
                named, conf = self._names(sets), 0.0 if path == NO_VOTES else float(p.max())
                if r < last[i]:
                    why = f"set {named}, confidence {conf:.3f}: asked {', '.join(self.tiers[r])}"
                else:
                    why = self._stop_reason(path, p, sets, r)
                trace.append(CascadeRound(tier=r, voters=voters, prediction_set=named, confidence=conf, reason=why))
            out.append(trace)
        return out

    def _stop_reason(self, path: int, p: Array, pset: Array, r: int) -> str:
        if path == NO_VOTES:
            return "no votes"
        if self._sure(p, pset):
            what = "a single class" if self.config.answer_requires_singleton else "answerable"
            return what + (f" at confidence ≥ {self.escalate_below:.3f}" if self.escalate_below else "")
        if r >= len(self.tiers):
            return "unsure, and no cascade tier is left"
        if p.max() < self.escalate_at[r]:
            return f"hopeless for {', '.join(self.tiers[r])}: confidence {p.max():.3f} < {self.escalate_at[r]:.3f}"
        return "unsure; the cascade was off for this text (disabled, or no text to send)"

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

    def _sure(self, p: Array, pset: Array) -> bool:
        single = int(pset.sum()) == 1 and pset[int(p.argmax())] if self.config.answer_requires_singleton else True
        return bool(single and p.max() >= self.escalate_below)

    def _escalation(self, item: DecideItem, path: int, p: Array, pset: Array) -> Escalation | None:
        r = item.rounds
        if not (item.may_escalate and item.text) or r >= len(self.tiers) or path == NO_VOTES:
            return None
        confidence = float(p.max())
        if self._sure(p, pset) or confidence < self.escalate_at[r]:
            return None
        why = f"round {r}: set {self._names(pset)}, confidence {confidence:.3f}"
        return Escalation(item.text_id, list(self.tiers[r]), why, tier=r + 1)

    def _names(self, pset: Array) -> list[str]:
        return [c for c, inside in zip(self.classes, pset, strict=True) if inside]

    def _decision(
        self, item: DecideItem, used: list[Vote], notes: list[str], path: int, p: Array, pset: Array
    ) -> Decision:
        arrived = {v.voter for v in used}
        escalated = item.rounds > 0 or bool(arrived & set(self._cascade))
        wanted = [*self.first_stage_voters, *(v for tier in self.tiers[: item.rounds] for v in tier)]
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
        if self.config.answer_requires_singleton and size == 0:
            return None, f"empty prediction set at {level}: no class is plausible", []
        if self.config.answer_requires_singleton and (size > 1 or not pset[top]):
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
            "escalate_at": list(self.escalate_at),
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
                # bundles from before the option always required a one-class set: keep their behaviour
                config=ConformalConfig.model_validate({"answer_requires_singleton": True, **data["config"]}),
                sets=sets,
                slices=slices,
                answer_at=float(data["answer_at"]),
                escalate_at=tuple(float(t) for t in data["escalate_at"]),
                escalate_below=float(data["escalate_below"]),
                version=str(data["version"]),
                calibration_report=dict(data.get("calibration_report", {})),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PolicyFormatError(f"bad serialized ArbiterPolicy: {exc}") from exc
