"""Learn-then-test: the answer threshold (and the cascade's escalation threshold) with a finite-sample guarantee.

The arbiter answers a text when its conformal set is a single class and its confidence is ≥ λ. For
every candidate λ (and escalation threshold τ) the selective risk — the mean harm-weighted loss over
the calibration texts it would answer — gets a Hoeffding–Bentkus p-value for "risk > target" (MAPIE's
`compute_hoeffding_bentkus_p_value`, with n the number answered); the LLM call rate gets one for
"rate > budget". MAPIE's fixed-sequence testing along λ (most confident first; several starts spread
along the chain, so one confidently wrong text early on does not end the search), Bonferroni over τ, keeps
the family-wise error ≤ δ, so with probability ≥ 1 − δ every selected pair meets both targets. Among them
the one answering most calibration texts wins. No valid pair: the arbiter abstains on everything, and
the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from mapie.risk_control import FWERFixedSequenceTesting, control_fwer
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
from numpy.typing import NDArray

Array = NDArray[np.float64]
Mask = NDArray[np.bool_]
NEVER = 2.0  # a threshold above every probability: never answer / never escalate


def harm_loss(classes: list[str], harm: Mapping[str, float], weighted: bool = True) -> Array:
    """(k, k) loss of predicting column j when row i is true: 0 if equal, else max(harm) / largest harm (or 1)."""
    h = np.array([harm[c] for c in classes], dtype=np.float64)
    loss = np.maximum(h[:, None], h[None, :]) / h.max() if weighted else np.ones((len(h), len(h)))
    np.fill_diagonal(loss, 0.0)
    return np.asarray(loss, dtype=np.float64)


@dataclass(frozen=True)
class Stage:
    """One way of deciding the calibration texts: confidence, predicted class and 'set is a singleton'."""

    confidence: Array
    prediction: NDArray[np.int64]
    singleton: Mask

    @classmethod
    def from_sets(cls, probs: Array, sets: Mask) -> Stage:
        """From combined probabilities (NaN rows: no votes) and conformal sets."""
        voted = ~np.isnan(probs).any(axis=1)
        p = np.nan_to_num(probs)
        pred = p.argmax(axis=1)
        single = voted & (sets.sum(axis=1) == 1) & sets[np.arange(len(p)), pred]
        return cls(np.where(voted, p.max(axis=1), 0.0), pred, single)


@dataclass(frozen=True)
class RiskChoice:
    """The thresholds chosen and what they achieve on the calibration split."""

    answer_at: float
    escalate_at: float
    escalate_below: float
    certified: bool
    coverage: float
    risk: float
    error: float
    call_rate: float
    p_value: float
    n: int
    target: float
    delta: float
    budget: float | None

    def to_dict(self) -> dict[str, float | bool | int | None]:
        """JSON-ready."""
        return asdict(self)


def choose_thresholds(
    cheap: Stage,
    y: NDArray[np.int64],
    loss: Array,
    target: float,
    delta: float,
    grid: int = 200,
    full: Stage | None = None,
    budget: float | None = None,
    n_tau: int = 4,
    starts: int = 4,
) -> RiskChoice:
    """λ (and τ when `full`, the decisions with the expensive votes, is given) by learn-then-test.

    Escalation candidates are the texts the cheap-only policy abstains on (set not a single class, or
    confidence below its own certified λ₀); τ keeps the hopeless ones (confidence < τ) from the LLM.
    """
    binary = bool(np.isin(loss, (0.0, 1.0)).all())
    cascade = full is not None and budget is not None
    level = delta / (n_tau if cascade else 1)  # Bonferroni over the τ chains
    chain = _Chain(y, loss, target, level, binary, grid, budget, starts)
    best = chain.run(cheap, np.zeros(len(y), dtype=bool), NEVER, NEVER)
    if cascade:
        assert full is not None and budget is not None
        below = best.answer_at if best.certified else NEVER
        unsure = ~cheap.singleton | (cheap.confidence < below)
        for tau in _tau_grid(cheap.confidence[unsure], budget, len(y), n_tau - 1):
            escalate = unsure & (cheap.confidence >= tau)
            choice = chain.run(_merge(cheap, full, escalate), escalate, tau, below)
            if choice.certified and (choice.coverage, -choice.call_rate) > (best.coverage, -best.call_rate):
                best = choice
    return best


@dataclass
class _Chain:
    """One fixed-sequence test along λ for a given way of deciding (with or without escalations)."""

    y: NDArray[np.int64]
    loss: Array
    target: float
    level: float
    binary: bool
    grid: int
    budget: float | None
    starts: int

    def run(self, stage: Stage, escalate: Mask, tau: float, below: float) -> RiskChoice:
        """The certified λ answering most texts; else an uncertified NEVER choice with the closest p-value."""
        y, n = self.y, len(self.y)
        starts = self.starts
        lambdas = _lambda_chain(stage, _min_answered(self.target, self.level / starts, self.binary, n), self.grid)
        answered = stage.singleton[None, :] & (stage.confidence[None, :] >= lambdas[:, None])  # (G, n)
        n_ans = answered.sum(axis=1)
        risk = (answered * self.loss[y, stage.prediction]).sum(axis=1) / np.maximum(n_ans, 1)
        hb = compute_hoeffding_bentkus_p_value(risk, n_ans.astype(float), self.target, self.binary)[:, 0]
        p = np.where(n_ans > 0, hb, 1.0)
        calls = float(escalate.mean()) if n else 0.0
        if self.budget is not None and escalate.any():
            p_call = compute_hoeffding_bentkus_p_value(np.array([calls]), n, self.budget, True)[0, 0]
            p = np.maximum(p, p_call)
        procedure = FWERFixedSequenceTesting(n_starts=min(starts, len(p)))
        valid = np.asarray(control_fwer(p, self.level, fwer_method=procedure), dtype=np.int64)
        errors = (answered & (y[None, :] != stage.prediction[None, :])).sum(axis=1) / np.maximum(n_ans, 1)
        i = int(valid[np.argmax(n_ans[valid])]) if len(valid) else int(np.argmin(p))
        ok = len(valid) > 0
        return RiskChoice(
            answer_at=float(lambdas[i]) if ok else NEVER,
            escalate_at=tau if ok else NEVER,
            escalate_below=below if ok else NEVER,
            certified=ok,
            coverage=float(n_ans[i] / n) if ok else 0.0,
            risk=float(risk[i]),
            error=float(errors[i]),
            call_rate=calls if ok else 0.0,
            p_value=float(p[i]),
            n=n,
            target=self.target,
            delta=self.level,
            budget=self.budget,
        )


def _min_answered(target: float, level: float, binary: bool, limit: int) -> int:
    """Fewest answered texts that could certify the target at all (with no mistakes): where the chain starts."""
    sizes = np.arange(1, max(limit, 1) + 1, dtype=float)
    p = compute_hoeffding_bentkus_p_value(np.zeros_like(sizes), sizes, target, binary)[:, 0]
    ok = np.flatnonzero(p <= level)
    return int(sizes[ok[0]]) if len(ok) else limit + 1


def _lambda_chain(stage: Stage, start: int, size: int) -> Array:
    """λ values, descending, answering `start`, … up to every answerable text: the fixed testing order.

    The positions depend only on counts (fixed before any label is seen); the first one is the smallest
    count that could pass the test, so the chain does not stop on hopeless tiny-coverage thresholds.
    """
    conf = np.sort(stage.confidence[stage.singleton])[::-1]
    if len(conf) < start:
        return np.array([NEVER])
    counts = np.unique(np.linspace(start, len(conf), size).astype(int))
    return np.asarray(np.unique(conf[counts - 1])[::-1], dtype=np.float64)


def _tau_grid(unsure: Array, budget: float, n: int, count: int) -> list[float]:
    """τ values whose empirical call rates step up to 90 % of the budget (room for the upper bound)."""
    ranked = np.sort(unsure)[::-1]
    taus = []
    for rate in np.linspace(0.9 * budget / count, 0.9 * budget, count):
        k = min(int(rate * n), len(ranked))
        if k > 0:
            taus.append(float(ranked[k - 1]))
    return list(dict.fromkeys(taus))


def _merge(cheap: Stage, full: Stage, escalate: Mask) -> Stage:
    """Escalated texts are decided with the expensive votes; the rest as the cheap voters decided."""
    return Stage(
        np.where(escalate, full.confidence, cheap.confidence),
        np.where(escalate, full.prediction, cheap.prediction),
        np.where(escalate, full.singleton, cheap.singleton),
    )
