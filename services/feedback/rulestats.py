"""Per-rule telemetry for the regex DSL from feedback: fires, precision against reviewed labels, conflicts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RuleMeta:
    """What a rule claims: a label, a safety floor (`min_label`), or a forced review."""

    rule_id: str
    label: str | None = None
    min_label: str | None = None
    review: bool = False


@dataclass
class RuleStats:
    """One rule's record: how often it fired, and how often reviewed texts proved it right."""

    rule_id: str
    label: str | None = None
    fires: int = 0
    labelled: int = 0
    correct: int = 0
    confusions: Counter[str] = field(default_factory=Counter)  # true labels of the texts it got wrong
    conflicts_with_rules: int = 0  # fired together with a rule that claims another label
    conflicts_with_decision: int = 0  # the ensemble decided another label
    disputed: int = 0  # texts it fired on where reviewers disagree

    @property
    def precision(self) -> float | None:
        """Share of reviewed firings whose true label agreed with the rule; None before any review."""
        return self.correct / self.labelled if self.labelled else None

    @property
    def precision_lower(self) -> float | None:
        """Wilson 95 % lower bound of the precision: few reviews give a low bound, not a lucky 1.0."""
        if not self.labelled:
            return None
        n, p, z = self.labelled, self.correct / self.labelled, 1.96
        centre = p + z * z / (2 * n)
        margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return max(0.0, (centre - margin) / (1 + z * z / n))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "rule_id": self.rule_id,
            "label": self.label,
            "fires": self.fires,
            "labelled": self.labelled,
            "correct": self.correct,
            "wrong": self.labelled - self.correct,
            "precision": self.precision,
            "precision_lower_95": self.precision_lower,
            "confusions": dict(self.confusions),
            "conflicts": {
                "with_rules": self.conflicts_with_rules,
                "with_decision": self.conflicts_with_decision,
                "disputed_by_reviewers": self.disputed,
            },
        }


def is_correct(meta: RuleMeta | None, true_label: str, harm: Callable[[str], float]) -> bool | None:
    """Whether a firing was right: the rule's label, or a true label at least as harmful as its floor."""
    if meta is None:
        return None
    if meta.label is not None:
        return true_label == meta.label
    if meta.min_label is not None:
        return harm(true_label) >= harm(meta.min_label)
    return None  # a review-only rule claims no label


def rule_stats(
    fires: dict[str, int],
    reviewed: Iterable[tuple[str, str]],
    meta: dict[str, RuleMeta],
    harm: Callable[[str], float],
    conflicts_with_rules: dict[str, int] | None = None,
    conflicts_with_decision: dict[str, int] | None = None,
    disputed: dict[str, int] | None = None,
) -> list[RuleStats]:
    """Stats for every rule that fired or is configured; `reviewed` holds (rule id, true label) per firing."""
    stats = {r: RuleStats(r, meta[r].label if r in meta else None) for r in {*fires, *meta}}
    for rule, n in fires.items():
        stats[rule].fires = n
    for rule, true_label in reviewed:
        s = stats.setdefault(rule, RuleStats(rule))
        verdict = is_correct(meta.get(rule), true_label, harm)
        if verdict is None:
            continue
        s.labelled += 1
        if verdict:
            s.correct += 1
        else:
            s.confusions[true_label] += 1
    for source, attr in (
        (conflicts_with_rules, "conflicts_with_rules"),
        (conflicts_with_decision, "conflicts_with_decision"),
        (disputed, "disputed"),
    ):
        for rule, n in (source or {}).items():
            if rule in stats:
                setattr(stats[rule], attr, n)
    # worst first: lowest precision bound among reviewed rules, then the most fired
    return sorted(
        stats.values(),
        key=lambda s: (s.precision_lower is None, s.precision_lower or 0.0, -s.fires, s.rule_id),
    )
