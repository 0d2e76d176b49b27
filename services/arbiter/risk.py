"""Learn-then-test: the answer threshold and the cascade's escalation thresholds, with a finite-sample guarantee.

The arbiter answers a text when its conformal set is a single class and its confidence is ≥ λ. The
cascade asks its tiers (cheap to expensive: e.g. the embedding model, then the LLM) one round at a time
for texts whose set is still not a single class, unless they are hopeless (confidence < τᵣ, fixed from
unlabeled confidences so that at most 90 % of the tier's budget is used). For every candidate λ the
selective risk — the mean loss over the calibration texts it would answer — gets a p-value for
"risk > target": the exact binomial tail (Clopper–Pearson: P[Bin(n, target) ≤ errors], n the number
answered) when the loss is 0/1, Hoeffding–Bentkus (MAPIE's `compute_hoeffding_bentkus_p_value`) when it is
harm-weighted; the share of texts reaching each tier gets one for "share > that tier's budget"; a λ is
valid when all hold (the largest p-value). MAPIE's fixed-sequence testing along λ (most confident first,
from a label-free start where certification is likely — see `_lambda_chain` — one start by default so δ
is not split)
keeps the family-wise error ≤ δ, so with probability ≥ 1 − δ every valid λ meets every target at once; the
one answering most calibration texts wins. No valid λ: the arbiter abstains on everything, and the report
says so, with the certifiable frontier (target → coverage) to choose a reachable target from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from mapie.risk_control import FWERFixedSequenceTesting, control_fwer
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
from numpy.typing import NDArray
from scipy.stats import binom, poisson

Array = NDArray[np.float64]
Mask = NDArray[np.bool_]
NEVER = 2.0  # a threshold above every probability: never answer / never escalate
OVERCONFIDENCE = 2.0  # the chain's start assumes this many times the errors the confidences predict
FRONTIER_TARGETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)


def risk_p_values(risk: Array, n: Array, target: float, binary: bool) -> Array:
    """p-values for "mean loss > target" given the mean loss over n texts (1.0 where n = 0).

    0/1 loss: the exact binomial tail P[Bin(n, target) ≤ errors] (Clopper–Pearson), valid on its own (MAPIE's
    binary Hoeffding–Bentkus takes the smaller of this tail and Hoeffding's bound, and a minimum of two
    p-values is not a p-value); bounded non-binary loss: Hoeffding–Bentkus.
    """
    risk, n = np.asarray(risk, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if binary:
        p = binom.cdf(np.round(risk * n), n, target)
    else:
        p = compute_hoeffding_bentkus_p_value(risk, n, target, False)[:, 0]
    return np.where(n > 0, np.minimum(p, 1.0), 1.0)


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
    # a label-free estimate of each answer's chance to be right, for where the test starts (None: confidence)
    expected: Array | None = None

    @classmethod
    def from_sets(cls, probs: Array, sets: Mask, require_singleton: bool = True, temperature: float = 1.0) -> Stage:
        """From combined probabilities (NaN rows: no votes) and conformal sets.

        `singleton` marks the texts the set rule lets the arbiter answer: those with votes whose set is the
        predicted class alone, or (`require_singleton` False) every text with votes. `temperature`: the
        combiner's out-of-fold temperature; the top probability of softmax(log p / T) estimates each answer's
        chance to be right where the chain starts (the thresholds stay on the confidences as served).
        """
        voted = ~np.isnan(probs).any(axis=1)
        p = np.nan_to_num(probs)
        pred = p.argmax(axis=1)
        single = voted & (sets.sum(axis=1) == 1) & sets[np.arange(len(p)), pred] if require_singleton else voted
        expected = None
        if temperature != 1.0:
            z = np.log(np.clip(p, 1e-12, 1.0)) / temperature
            e = np.exp(z - z.max(axis=1, keepdims=True))
            expected = np.where(voted, (e / e.sum(axis=1, keepdims=True))[np.arange(len(p)), pred], 0.0)
        return cls(np.where(voted, p.max(axis=1), 0.0), pred, np.asarray(single, dtype=bool), expected)

    @property
    def chance(self) -> Array:
        """Each answer's estimated chance to be right (`expected`, else the confidence)."""
        return self.expected if self.expected is not None else self.confidence


@dataclass(frozen=True)
class RiskChoice:
    """The thresholds chosen and what they achieve on the calibration split."""

    answer_at: float
    escalate_at: tuple[float, ...]  # τ of each tier (NEVER: the plan stops before it)
    escalate_below: float
    certified: bool
    coverage: float
    risk: float
    error: float
    reach: tuple[float, ...]  # share of calibration texts reaching each tier
    p_value: float
    n: int
    target: float
    delta: float
    budgets: tuple[float, ...]
    frontier: tuple[dict[str, Any], ...] = ()  # per target: the coverage certifiable on this calibration data

    @property
    def call_rate(self) -> float:
        """Share of texts escalated at all (to the first tier)."""
        return self.reach[0] if self.reach else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "call_rate": self.call_rate}


def choose_thresholds(
    stages: Sequence[Stage],
    y: NDArray[np.int64],
    loss: Array,
    target: float,
    delta: float,
    grid: int = 200,
    budgets: Sequence[float] = (),
    starts: int = 1,
    frontier_targets: Sequence[float] = FRONTIER_TARGETS,
) -> RiskChoice:
    """λ by learn-then-test on the decisions the cascade leads to; `stages[r]` decides with rounds 0…r.

    The cascade's plan uses no labels, so it costs no multiplicity: after round r − 1, the texts the
    voters so far could not answer — not answerable by the set rule, or below λ̂, the label-free estimate
    of the answer threshold (`expected_threshold`) — are escalated to tier r, most confident first, up to
    90 % of the tier's budget (τᵣ is the confidence where that share is reached; the rest are hopeless).
    Only the λ chain is tested, with the reach of each tier as part of every hypothesis.
    """
    binary = bool(np.isin(loss, (0.0, 1.0)).all())
    tiers = min(len(stages) - 1, len(budgets))
    chain = _Chain(y, loss, target, delta, binary, grid, tuple(budgets[:tiers]), starts)
    n = len(y)
    stage, reach, taus = stages[0], [], []
    below = expected_threshold(stages[0], target) if tiers else 0.0
    at_last = np.ones(n, dtype=bool)
    for r in range(1, tiers + 1):
        unsure = at_last & ~(stage.singleton & (stage.confidence >= below))
        grid_r = _tau_grid(stage.confidence[unsure], budgets[r - 1], n, 1)
        if not grid_r:
            break
        at_last = unsure & (stage.confidence >= grid_r[0])
        stage = _merge(stage, stages[r], at_last)
        reach.append(at_last)
        taus.append(grid_r[0])
    plan = tuple(taus) + (NEVER,) * (tiers - len(taus))
    below = below if taus else 0.0
    choice = chain.run(stage, reach, plan, below)
    points = []
    for t in sorted({*frontier_targets, target}):
        c = choice if t == target else replace(chain, target=t).run(stage, reach, plan, below)
        points.append({"target": t, "certified": c.certified, "coverage": c.coverage, "error": c.error})
    return replace(choice, frontier=tuple(points))


@dataclass
class _Chain:
    """One fixed-sequence test along λ for a given way of deciding (with or without escalations)."""

    y: NDArray[np.int64]
    loss: Array
    target: float
    level: float
    binary: bool
    grid: int
    budgets: tuple[float, ...]
    starts: int

    def run(self, stage: Stage, reach: Sequence[Mask], taus: tuple[float, ...], below: float) -> RiskChoice:
        """The certified λ answering most texts; else an uncertified NEVER choice with the closest p-value.

        With a temperature (`stage.expected`) two chains are tested, each at half the level (Bonferroni): one
        starting where the served confidences place it, one where the temperature-scaled ones do. Measured:
        either alone can certify nothing where the other certifies most texts (SMS: 0.996 by confidence, 0 by
        the scaled ones; TREC with the fine-tuned voter: 0 and 0.164)."""
        if stage.expected is None or self.starts != 1:
            return self._run(stage, reach, taus, below, self.level)
        choices = [
            replace(self, level=self.level / 2)._run(s, reach, taus, below, self.level)
            for s in (replace(stage, expected=None), stage)
        ]
        certified = [c for c in choices if c.certified]
        if certified:
            return max(certified, key=lambda c: c.coverage)
        return min(choices, key=lambda c: c.p_value)

    def _run(
        self, stage: Stage, reach: Sequence[Mask], taus: tuple[float, ...], below: float, reported: float
    ) -> RiskChoice:
        y, n = self.y, len(self.y)
        starts = self.starts
        least = _min_answered(self.target, self.level / starts, self.binary, n)
        lambdas = _lambda_chain(
            stage, least, self.grid, self.target if starts == 1 else None, self.level, binary=self.binary
        )
        answered = stage.singleton[None, :] & (stage.confidence[None, :] >= lambdas[:, None])  # (G, n)
        n_ans = answered.sum(axis=1)
        risk = (answered * self.loss[y, stage.prediction]).sum(axis=1) / np.maximum(n_ans, 1)
        p = risk_p_values(risk, n_ans, self.target, self.binary)
        rates = [float(mask.mean()) if n else 0.0 for mask in reach]
        for rate, budget in zip(rates, self.budgets, strict=False):
            p = np.maximum(p, risk_p_values(np.array([rate]), np.array([n]), budget, True)[0])
        procedure = FWERFixedSequenceTesting(n_starts=min(starts, len(p)))
        valid = np.asarray(control_fwer(p, self.level, fwer_method=procedure), dtype=np.int64)
        errors = (answered & (y[None, :] != stage.prediction[None, :])).sum(axis=1) / np.maximum(n_ans, 1)
        i = int(valid[np.argmax(n_ans[valid])]) if len(valid) else int(np.argmin(p))
        ok = len(valid) > 0
        never = (NEVER,) * len(self.budgets)
        reached = tuple(rates) + (0.0,) * (len(self.budgets) - len(rates))
        return RiskChoice(
            answer_at=float(lambdas[i]) if ok else NEVER,
            escalate_at=taus if ok else never,
            escalate_below=below if ok else NEVER,
            certified=ok,
            coverage=float(n_ans[i] / n) if ok else 0.0,
            risk=float(risk[i]),
            error=float(errors[i]),
            reach=reached if ok else (0.0,) * len(self.budgets),
            p_value=float(p[i]),
            n=n,
            target=self.target,
            delta=reported,
            budgets=self.budgets,
        )


def expected_threshold(stage: Stage, target: float) -> float:
    """λ̂: the lowest confidence at which the *expected* error of the answered texts (the mean of 1 − chance
    over the answerable texts at or above it; the combined probabilities are calibrated) stays ≤ target.

    Label-free, so the cascade may use it to decide what to escalate without costing multiplicity.
    """
    conf, chance = _ranked(stage)
    expected = np.cumsum(1.0 - chance) / np.arange(1, len(conf) + 1)
    within = np.flatnonzero(expected <= target)
    return float(conf[within[-1]]) if len(within) else NEVER


def _ranked(stage: Stage) -> tuple[Array, Array]:
    """The answerable texts' confidences, most confident first, and their estimated chances in that order."""
    rows = np.flatnonzero(stage.singleton)
    order = rows[np.argsort(-stage.confidence[rows], kind="stable")]
    return stage.confidence[order], stage.chance[order]


def _min_answered(target: float, level: float, binary: bool, limit: int) -> int:
    """Fewest answered texts that could certify the target at all (with no mistakes): where the chain starts."""
    sizes = np.arange(1, max(limit, 1) + 1, dtype=float)
    p = risk_p_values(np.zeros_like(sizes), sizes, target, binary)
    ok = np.flatnonzero(p <= level)
    return int(sizes[ok[0]]) if len(ok) else limit + 1


def _lambda_chain(
    stage: Stage, start: int, size: int, target: float | None = None, level: float = 0.1, binary: bool = True
) -> Array:
    """λ values, descending, from a label-free start up to every answerable text: the fixed testing order.

    The order uses no label but one: the combiner's temperature (one scalar fitted on the out-of-fold labels)
    softens the confidences in the estimate below, so the start is not strictly label-free; the repeated-split
    benchmark (`quality.py --validity`) measures what that costs. With a `target`, it starts where
    certification is most likely: the count c of most confident texts with the highest chance to pass, the
    chance that the errors — Poisson with a pessimistic *expected* count, 1 + 2 × the sum of 1 − chance
    (`Stage.chance`, the temperature-scaled confidence) — stay within the most a passing test at c allows.
    Never below `start`, the smallest count that could pass at all. A chain started at the very most confident
    texts ends at the first confidently wrong text among them; started where passing is likely, one early
    mistake is diluted.
    """
    conf, chance = _ranked(stage)
    if len(conf) < start:
        return np.array([NEVER])
    first = start
    if target is not None:
        counts = np.arange(start, len(conf) + 1)
        allowed = _allowed_errors(counts, target, level, binary)
        # tails of combined probabilities run overconfident (2–3× the errors 1 − confidence predicts among the
        # most confident TREC texts): the start assumes twice the expected errors plus one
        passing = poisson.cdf(allowed, 1.0 + OVERCONFIDENCE * np.cumsum(1.0 - chance)[counts - 1])
        first = int(counts[int(np.argmax(passing))])
    counts = np.unique(np.linspace(first, len(conf), size).astype(int))
    return np.asarray(np.unique(conf[counts - 1])[::-1], dtype=np.float64)


def _allowed_errors(counts: NDArray[np.int64], target: float, level: float, binary: bool) -> Array:
    """The most mistakes (each costing the full loss 1) that a test of each count in `counts` still passes at
    `level`: the binomial tail for 0/1 loss; for harm-weighted loss the Hoeffding–Bentkus p-value the test
    uses, which allows fewer (-1 where even none pass)."""
    allowed = binom.ppf(level, counts, target)  # the fewest errors whose tail reaches the level…
    allowed = allowed - (binom.cdf(allowed, counts, target) > level)  # …less one unless within it
    if binary:
        return np.asarray(allowed, dtype=np.float64)
    most = int(max(allowed.max(), 0)) + 1
    k = np.arange(most + 1, dtype=np.float64)
    n = np.repeat(counts.astype(np.float64), len(k))
    p = risk_p_values(np.tile(k, len(counts)) / n, n, target, False).reshape(len(counts), len(k))
    passing = p <= level
    return np.where(passing.any(axis=1), passing.shape[1] - 1 - np.argmax(passing[:, ::-1], axis=1), -1).astype(
        np.float64
    )


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
    """Escalated texts are decided with the next tier's votes; the rest as they were."""
    expected = None
    if cheap.expected is not None or full.expected is not None:
        expected = np.where(escalate, full.chance, cheap.chance)
    return Stage(
        np.where(escalate, full.confidence, cheap.confidence),
        np.where(escalate, full.prediction, cheap.prediction),
        np.where(escalate, full.singleton, cheap.singleton),
        expected,
    )
