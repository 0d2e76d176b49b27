"""The arbiter's array math: the log-linear pool, consensus-or-pool combination, sets, abstain threshold.

Everything works on (n, m, k) arrays (texts × voters × classes), so the service (n = 1) and the
calibration of the policy (the whole split) run the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from flockwatch.common.metrics import has_opinion
from numpy.typing import NDArray
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

Array = NDArray[np.float64]
PROB_FLOOR = 1e-6
FORMAT = "flockwatch.arbiter.log_linear_pool/1"
NO_VOTES, CONSENSUS, COMBINER = 0, 1, 2
PATHS = ("no_votes", "consensus", "combiner")  # Decision.path, indexed by the codes above


class PoolFormatError(ValueError):
    """A serialized pool cannot be read (wrong format tag, missing fields, inconsistent sizes)."""


def stack_votes(voters: list[str], voter_probs: Mapping[str, Array]) -> tuple[Array, NDArray[np.bool_]]:
    """Stack per-voter (n, k) arrays into (n, m, k) in `voters` order, NaN rows zeroed, plus an (n, m) mask.

    A voter is present for a row when its row has no NaN; voters absent from `voter_probs` are
    absent everywhere, and names not in `voters` are ignored.
    """
    arrays = [np.asarray(p, dtype=np.float64) for p in voter_probs.values()]
    if not arrays:
        raise ValueError("no voter arrays given")
    n, k = arrays[0].shape
    probs = np.zeros((n, len(voters), k))
    present = np.zeros((n, len(voters)), dtype=bool)
    for j, voter in enumerate(voters):
        if voter in voter_probs:
            p = np.asarray(voter_probs[voter], dtype=np.float64)
            if p.shape != (n, k):
                raise ValueError(f"voter {voter!r}: shape {p.shape}, expected {(n, k)}")
            present[:, j] = has_opinion(p)
            probs[present[:, j], j] = p[present[:, j]]
    return probs, present


def _log_clipped(probs: Array) -> Array:
    """log of probabilities clipped to [PROB_FLOOR, 1] (np.clip costs more on tiny arrays)."""
    return np.log(np.minimum(np.maximum(probs, PROB_FLOOR), 1.0))


class LogLinearPool(BaseEstimator):
    """log p(c) ∝ b_c + Σ_v w_v · log p_v(c) over the voters present; weights w ≥ 0, biases b (L2).

    Training rows are repeated `n_copies` times with each present voter dropped with probability
    `dropout`, so the pool is fitted for whatever subset of voters arrives. With no voter present the
    output is softmax(b), a learned prior.
    """

    def __init__(
        self,
        l2: float = 1e-3,
        dropout: float = 0.3,
        n_copies: int = 2,
        max_iter: int = 500,
        random_state: int = 0,
    ) -> None:
        self.l2 = l2
        self.dropout = dropout
        self.n_copies = n_copies
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, voter_probs: Mapping[str, Array], y: NDArray[np.integer[Any]]) -> Self:
        """Learn weights and biases from per-voter (n, k) probabilities (NaN rows: abstained/missing)."""
        voters = list(voter_probs)
        probs, present = stack_votes(voters, voter_probs)
        y = np.asarray(y, dtype=np.int64)
        n, m, k = probs.shape
        if y.shape != (n,) or y.min() < 0 or y.max() >= k:
            raise ValueError(f"y must be {n} class indices in [0, {k})")
        rng = np.random.default_rng(self.random_state)
        masks = [present] + [present & (rng.random((n, m)) >= self.dropout) for _ in range(self.n_copies)]
        logp = _log_clipped(probs)
        z = np.concatenate([logp * mask[:, :, None] for mask in masks])  # (N, m, k), 0 where dropped
        y_all = np.tile(y, len(masks))
        onehot = np.eye(k)[y_all]
        size = len(y_all)

        def loss(theta: Array) -> tuple[float, Array]:
            w, b = theta[:m], theta[m:]
            logits = b + np.einsum("nmk,m->nk", z, w)
            lse = logsumexp(logits, axis=1)
            nll = float(np.mean(lse - logits[np.arange(size), y_all])) + self.l2 * float(b @ b)
            g = (np.exp(logits - lse[:, None]) - onehot) / size
            grad = np.concatenate([np.einsum("nmk,nk->m", z, g), g.sum(axis=0) + 2 * self.l2 * b])
            return nll, grad

        theta0 = np.concatenate([np.ones(m), np.zeros(k)])
        bounds = [(0.0, None)] * m + [(None, None)] * k
        res = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": self.max_iter})
        self.voters_ = voters
        self.weights_ = np.asarray(res.x[:m], dtype=np.float64)
        self.bias_ = np.asarray(res.x[m:], dtype=np.float64)
        self.n_classes_ = k
        self.loss_ = float(res.fun)
        self.converged_ = bool(res.success)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise NotFittedError("LogLinearPool is not fitted")

    def predict_proba_stacked(self, probs: Array, present: NDArray[np.bool_]) -> Array:
        """Pooled (n, k) probabilities from (n, m, k) probabilities aligned with `voters_` and their mask."""
        self._check_fitted()
        logits = self.bias_ + np.einsum("nmk,nm->nk", _log_clipped(probs), present * self.weights_)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))  # numpy, not scipy: ~4 µs less per text
        return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)

    def predict_proba(self, voter_probs: Mapping[str, Array]) -> Array:
        """Pooled (n, k) probabilities from per-voter (n, k) arrays (NaN rows: abstained/missing)."""
        self._check_fitted()
        return self.predict_proba_stacked(*stack_votes(self.voters_, voter_probs))

    @property
    def prior_(self) -> Array:
        """The output when no voter is present: softmax of the biases."""
        self._check_fitted()
        return np.asarray(softmax(self.bias_), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict: parameters and fitted weights (floats round-trip exactly)."""
        self._check_fitted()
        return {
            "format": FORMAT,
            "params": self.get_params(),
            "voters": list(self.voters_),
            "weights": [float(w) for w in self.weights_],
            "bias": [float(b) for b in self.bias_],
            "loss": self.loss_,
            "converged": self.converged_,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogLinearPool:
        """Rebuild a fitted pool from `to_dict()` output."""
        if data.get("format") != FORMAT:
            raise PoolFormatError(f"not a serialized LogLinearPool: format {data.get('format')!r}")
        try:
            pool = cls(**data["params"])
            pool.voters_ = [str(v) for v in data["voters"]]
            pool.weights_ = np.asarray(data["weights"], dtype=np.float64)
            pool.bias_ = np.asarray(data["bias"], dtype=np.float64)
            pool.loss_ = float(data["loss"])
            pool.converged_ = bool(data["converged"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PoolFormatError(f"bad serialized LogLinearPool: {exc}") from exc
        if len(pool.weights_) != len(pool.voters_) or pool.bias_.ndim != 1:
            raise PoolFormatError("weights must match voters and bias must be a vector")
        pool.n_classes_ = len(pool.bias_)
        return pool


@dataclass(frozen=True)
class Combined:
    """Combined (n, k) probabilities (NaN rows where no voter gave an opinion) and each row's path."""

    probabilities: Array
    path: NDArray[np.int8]


def combine(pool: LogLinearPool, probs: Array, present: NDArray[np.bool_], consensus_min_prob: float) -> Combined:
    """Consensus fast path where ≥ 2 voters share the top class, each at ≥ consensus_min_prob; else the pool.

    The consensus path skips the pool on purpose: its probabilities are the mean of the agreeing
    voters' vectors, so its confidence is their mean probability for the shared class.
    """
    n, _, k = probs.shape
    n_present = present.sum(axis=1)
    top = probs.argmax(axis=2)
    same = np.where(present, top, k).min(axis=1) == np.where(present, top, -1).max(axis=1)
    sure = (~present | (probs.max(axis=2) >= consensus_min_prob)).all(axis=1)
    consensus = (n_present >= 2) & same & sure
    pooled = ~consensus & (n_present > 0)
    if pooled.all():  # the usual single-text case: skip the masked copies
        return Combined(pool.predict_proba_stacked(probs, present), np.full(n, COMBINER, dtype=np.int8))
    out = np.full((n, k), np.nan)
    if consensus.any():  # absent voters' rows are zeros, so the sum over voters is over the present ones
        out[consensus] = probs[consensus].sum(axis=1) / n_present[consensus, None]
    if pooled.any():
        out[pooled] = pool.predict_proba_stacked(probs[pooled], present[pooled])
    path = np.where(consensus, CONSENSUS, np.where(pooled, COMBINER, NO_VOTES)).astype(np.int8)
    return Combined(out, path)


def prediction_set_sizes(probs: Array, level: float) -> NDArray[np.int64]:
    """Per row, how many top classes (by descending probability) it takes to reach `level` cumulative mass.

    A first-version set from the combined probabilities: no coverage guarantee (conformal sets come later).
    """
    cumulative = np.cumsum(-np.sort(-probs, axis=1), axis=1)
    sizes = (cumulative < level - 1e-9).sum(axis=1) + 1  # tolerance: 0.3 + 0.6 must reach 0.9
    return np.asarray(np.minimum(sizes, probs.shape[1]), dtype=np.int64)


@dataclass(frozen=True)
class ThresholdChoice:
    """An abstention threshold and what it achieved: share answered, error among answered, target met."""

    threshold: float
    coverage: float
    error: float
    met: bool


def choose_abstain_threshold(
    confidences: Array, correct: NDArray[np.bool_], target_error: float, min_coverage: float = 0.0
) -> ThresholdChoice:
    """Lowest t whose answered texts (confidence ≥ t) err at most `target_error` with coverage ≥ min_coverage.

    Candidates are the observed confidences; NaN marks a text that always abstains (it counts in
    coverage, never as answered). When no t meets both, the t with the least error (among those with
    enough coverage, if any) comes back with `met=False`.
    """
    conf, hit = np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=bool)
    answerable = ~np.isnan(conf)
    if not answerable.any():
        return ThresholdChoice(float(np.nextafter(1.0, 2.0)), 0.0, 0.0, False)
    order = np.argsort(-conf[answerable], kind="stable")
    c, wrong = conf[answerable][order], ~hit[answerable][order]
    last = np.append(c[1:] != c[:-1], True)  # t = c[i] answers every text up to the last tie of c[i]
    answered = np.arange(1, len(c) + 1)[last]
    thresholds, errors = c[last], np.cumsum(wrong)[last] / answered
    coverages = answered / len(conf)
    covered = coverages >= min_coverage
    ok = covered & (errors <= target_error + 1e-12)
    if ok.any():
        i = int(np.flatnonzero(ok)[-1])  # thresholds descend: the last one is the lowest
    else:
        pool = covered if covered.any() else np.ones_like(covered)
        best = np.where(pool, errors, np.inf)
        i = int(np.flatnonzero(best == best.min())[-1])
    return ThresholdChoice(float(thresholds[i]), float(coverages[i]), float(errors[i]), bool(ok[i]))
