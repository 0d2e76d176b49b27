"""Drift: is live traffic still exchangeable with the calibration data the conformal guarantees rest on?

Score of a decision: its nonconformity without a label, 1 − confidence (the combined probability of the top
class). The reference is the same score on the calibration split, computed with the same bundle. The
calibration scores followed by the live scores form one sequence; under exchangeability each new score's
conformal p-value (its randomized rank among all scores so far) is uniform and independent of the earlier
ones, so a betting martingale on those p-values is a test martingale: by Ville's inequality it reaches
1/δ with probability at most δ if nothing drifted. The Simple Jumper (Vovk et al., "Testing randomness
online", 2021) bets on p-values being small (live texts less confident than calibration ones), large (more
confident), or neither, and moves its capital between those bets so it recovers after quiet stretches.

Label shift that leaves the confidences alone is invisible here (no labels are used); a windowed
Kolmogorov–Smirnov test of the latest scores against the reference is reported next to the martingale.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

BETS = (-1.0, 0.0, 1.0)  # betting functions 1 + ε (p − ½)


class SimpleJumper:
    """A conformal test martingale over p-values; `jump` is the share of capital redistributed each step."""

    def __init__(self, jump: float = 0.01) -> None:
        self.jump = jump
        self.capital = {e: 1.0 / len(BETS) for e in BETS}
        self.log_value = 0.0  # log of the martingale (its capital, starting from 1)

    def update(self, p: float) -> float:
        """Bet on one p-value; returns the new martingale value."""
        total = sum(self.capital.values())
        for e in BETS:
            self.capital[e] = ((1 - self.jump) * self.capital[e] + self.jump * total / len(BETS)) * (1 + e * (p - 0.5))
        total = sum(self.capital.values())
        self.log_value += math.log(total)
        # keep the components near 1 (the product of many factors would under- or overflow)
        self.capital = {e: c / total for e, c in self.capital.items()}
        return self.value

    @property
    def value(self) -> float:
        """The martingale's current value."""
        return math.exp(min(self.log_value, 700.0))


@dataclass
class DriftState:
    """What the monitor has seen since the reference was set."""

    version: str
    n_reference: int
    n_live: int = 0
    martingale: float = 1.0
    max_martingale: float = 1.0
    alarm: bool = False
    alarm_at: int | None = None
    ks: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


class DriftMonitor:
    """Conformal test martingale of live nonconformity scores against the bundle's calibration scores."""

    def __init__(
        self,
        reference: Sequence[float],
        version: str,
        delta: float = 0.01,
        jump: float = 0.01,
        window: int = 200,
        seed: int = 0,
    ) -> None:
        if not len(reference):
            raise ValueError("the drift monitor needs reference (calibration) scores")
        self.reference = np.asarray(reference, dtype=np.float64)
        self.delta = delta
        self._bag = sorted(float(s) for s in reference)  # every score so far: the conformal p-values' bag
        self._martingale = SimpleJumper(jump)
        self._window: deque[float] = deque(maxlen=window)
        self._rng = np.random.default_rng(seed)
        self.state = DriftState(version=version, n_reference=len(self._bag))

    def p_value(self, score: float) -> float:
        """Randomized conformal p-value of a new score among the bag (larger score: stranger; itself included)."""
        lo = bisect.bisect_left(self._bag, score)
        hi = bisect.bisect_right(self._bag, score)
        greater, ties = len(self._bag) - hi, hi - lo
        p = (greater + self._rng.uniform() * (ties + 1)) / (len(self._bag) + 1)
        bisect.insort(self._bag, score)
        return float(p)

    def update(self, scores: Iterable[float]) -> bool:
        """Feed live scores in arrival order; True when this batch raised the alarm (once per reference)."""
        raised = False
        state = self.state
        for score in scores:
            value = self._martingale.update(self.p_value(score))
            self._window.append(score)
            state.n_live += 1
            state.martingale = value
            state.max_martingale = max(state.max_martingale, value)
            if not state.alarm and value >= 1 / self.delta:
                state.alarm, state.alarm_at, raised = True, state.n_live, True
        return raised

    def ks(self) -> dict[str, float]:
        """Two-sample KS test of the latest window of live scores against the reference."""
        if len(self._window) < 10:
            return {}
        result = ks_2samp(np.asarray(self._window), self.reference)
        self.state.ks = {"statistic": float(result.statistic), "p_value": float(result.pvalue), "n": len(self._window)}
        return self.state.ks


def nonconformity(confidence: float) -> float:
    """The label-free score of a decision: 1 − the combined probability of its top class."""
    return 1.0 - float(confidence)
