"""The regex voter's pure core: compiled rules turn texts into class probabilities, safety triggers and traces."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from flockwatch.common.events import SafetyTrigger
from flockwatch.common.labels import LabelConfig
from flockwatch.common.voting import Opinion
from flockwatch.regex_voter.rules import RuleSet, RuleSpec, check_labels

NO_RULE = "no rule matched"
ONLY_SAFETY = "only safety rules matched"
# A pattern that refers to its own groups cannot be merged into an alternation (group numbers shift).
_GROUP_REFERENCE = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")


@dataclass(frozen=True)
class PatternMatch:
    """A pattern and the span of the text it matched."""

    pattern: str
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class RuleTrace:
    """Why one rule fired or did not on one text."""

    rule_id: str
    label: str | None
    priority: int
    fired: bool
    matched: tuple[PatternMatch, ...]
    missing: tuple[str, ...]
    blocked_by: PatternMatch | None
    safety: SafetyTrigger | None

    @property
    def reason(self) -> str:
        """One line for people."""
        if self.blocked_by is not None:
            return f"blocked by exclusion /{self.blocked_by.pattern}/ on {self.blocked_by.text!r}"
        if self.fired:
            return "matched " + ", ".join(f"/{m.pattern}/ on {m.text!r}" for m in self.matched)
        if self.matched:
            return "missing " + ", ".join(f"/{p}/" for p in self.missing)
        return "no pattern matched"


class _Rule:
    """A rule compiled once: the fast `fires` for predict, the itemized `trace` for explain."""

    def __init__(self, spec: RuleSpec, index: int, flags: int, confidence: float) -> None:
        self.spec, self.index, self.confidence = spec, index, confidence
        self.id, self.label, self.priority = spec.id, spec.label, spec.priority
        self.match_all = spec.match == "all"
        self.patterns = tuple(re.compile(p, flags) for p in spec.patterns)
        self.excludes = tuple(re.compile(p, flags) for p in spec.exclude)
        self.any_of = self.patterns if self.match_all else _merged(spec.patterns, flags)
        self.exclude_any = _merged(spec.exclude, flags)
        safety = spec.safety
        self.safety = (
            SafetyTrigger(rule_id=spec.id, min_label=safety.min_label, review=safety.review) if safety else None
        )

    @property
    def rank(self) -> tuple[bool, int, float, int]:
        """Sort key: labeled rules first, then higher priority, higher confidence, file order."""
        return (self.label is None, -self.priority, -self.confidence, self.index)

    def fires(self, text: str) -> bool:
        """Patterns match (any/all) and no exclusion does."""
        # Plain loops: this is the hot path, and generator expressions cost a few hundred ns each.
        if self.match_all:
            for p in self.patterns:
                if not p.search(text):
                    return False
        else:
            for p in self.any_of:
                if p.search(text):
                    break
            else:
                return False
        for p in self.exclude_any:  # noqa: SIM110 - a loop, for speed (see above)
            if p.search(text):
                return False
        return True

    def trace(self, text: str) -> RuleTrace:
        """Every matching pattern with its span, the missing ones and the blocking exclusion."""
        found = [(p.pattern, p.search(text)) for p in self.patterns]
        matched = tuple(_span(pattern, m) for pattern, m in found if m)
        missing = tuple(pattern for pattern, m in found if not m)
        satisfied = not missing if self.match_all else bool(matched)
        blocked = None
        if satisfied:
            hits = ((p.pattern, p.search(text)) for p in self.excludes)
            blocked = next((_span(pattern, m) for pattern, m in hits if m), None)
        return RuleTrace(
            self.id, self.label, self.priority, satisfied and blocked is None, matched, missing, blocked, self.safety
        )


def _span(pattern: str, m: re.Match[str]) -> PatternMatch:
    return PatternMatch(pattern, m.group(0), m.start(), m.end())


def _merged(patterns: Sequence[str], flags: int) -> tuple[re.Pattern[str], ...]:
    """One alternation for 'any of these' (one scan instead of many), when that keeps the semantics."""
    if len(patterns) < 2 or any(_GROUP_REFERENCE.search(p) for p in patterns):
        return tuple(re.compile(p, flags) for p in patterns)
    end = "\n)" if flags & re.VERBOSE else ")"  # a trailing comment in VERBOSE mode must not eat the ')'
    try:
        return (re.compile("|".join(f"(?:{p}{end}" for p in patterns), flags),)
    except re.error:  # e.g. inline global flags or repeated group names: keep them separate
        return tuple(re.compile(p, flags) for p in patterns)


def rules_version(ruleset: RuleSet) -> str:
    """First 12 hex of the sha256 of the rules' canonical content (defaults resolved, descriptions left out)."""
    canonical = [
        {
            "id": r.id,
            "label": r.label,
            "priority": r.priority,
            "confidence": ruleset.confidence_for(r),
            "patterns": r.patterns,
            "match": r.match,
            "exclude": r.exclude,
            "flags": ruleset.flags_for(r),
            "safety": r.safety.model_dump() if r.safety else None,
        }
        for r in ruleset.rules
    ]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:12]


class RuleEngine:
    """Applies a rule set to texts: the highest-priority labeled rules that fire decide the probabilities."""

    def __init__(self, ruleset: RuleSet, labels: LabelConfig) -> None:
        check_labels(ruleset, labels)
        self.ruleset, self.labels = ruleset, labels
        self.version = rules_version(ruleset)
        rules = [
            _Rule(spec, i, ruleset.flags_for(spec), ruleset.confidence_for(spec))
            for i, spec in enumerate(ruleset.rules)
        ]
        self._in_file_order = rules
        # Ranked once, so the rules that fire come out winner first.
        self._ranked = sorted(rules, key=lambda r: r.rank)

    def predict(self, texts: Sequence[str]) -> list[Opinion]:
        """One opinion per text: probabilities or an abstention, with safety triggers and fired rule ids."""
        return [self._decide([r for r in self._ranked if r.fires(text)]) for text in texts]

    def explain(self, text: str) -> list[RuleTrace]:
        """For every rule, in file order: whether it fired on `text` and why."""
        return [r.trace(text) for r in self._in_file_order]

    def _decide(self, fired: list[_Rule]) -> Opinion:
        evidence = tuple(r.id for r in fired)
        safety = tuple(r.safety for r in fired if r.safety is not None)
        if not fired or fired[0].label is None:
            return Opinion(None, ONLY_SAFETY if fired else NO_RULE, safety, evidence)
        top = [r for r in fired if r.label is not None and r.priority == fired[0].priority]
        return Opinion(self._probabilities(top), None, safety, evidence)

    def _probabilities(self, top: list[_Rule]) -> dict[str, float]:
        """Tied labels share the top confidence in proportion to their best confidences; the rest is even."""
        best: dict[str, float] = {}
        for rule in top:
            if rule.label is not None:
                best[rule.label] = max(best.get(rule.label, 0.0), rule.confidence)
        names = self.labels.names
        mass, total = max(best.values()), sum(best.values())
        others = len(names) - len(best)
        if others:
            # A tie must not leave a fired label below a class no rule named (low confidences, many classes): the
            # tied labels get at least the mass at which the weakest keeps, against each untied class, the odds its
            # own rule alone would give it (its confidence is above 1/n, so those odds are above 1).
            weakest = min(best.values())
            if weakest >= 1:
                mass = 1.0
            else:
                odds = weakest * (len(names) - 1) / (1 - weakest)
                mass = max(mass, odds / (odds + weakest * others / total))
        rest = (1 - mass) / others if others else 0.0
        # Every class is tied: nothing is left to spread over "other" classes, so spread it over all.
        spread = 0.0 if others else (1 - mass) / len(names)
        return {n: (mass * best[n] / total if n in best else rest) + spread for n in names}
