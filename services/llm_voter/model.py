"""The LLM voter's pure core: answer-word log-probabilities → calibrated class probabilities or an abstention."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flockwatch.common.service import VoterCore
from flockwatch.common.voting import Opinion
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize_scalar

VOTER = "llm"
INVALID = "invalid_output"
UNSURE = "llm_unsure"
# vLLM reports a token the grammar masked out as -9999.0 (its stand-in for -inf); treat anything this low as 0.
FLOOR = -9000.0


class Scorer(Protocol):
    """A backend: for each text, the log-probabilities of every answer word (class words, then abstain).

    None for a text means no valid answer could be had (after the backend's retries).
    """

    def score(self, texts: Sequence[str]) -> list[list[float] | None]: ...


@dataclass
class OutputCounts:
    """What the core saw: texts scored, invalid outputs (counted, then abstained on), abstentions by the model."""

    scored: int = 0
    invalid: int = 0
    unsure: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain mapping (for metrics and llm.json)."""
        return {"scored": self.scored, "invalid": self.invalid, "unsure": self.unsure}


def softmax(logits: NDArray[np.float64], temperature: float = 1.0) -> NDArray[np.float64]:
    """Row-wise softmax of `logits / temperature`, with -inf (masked words) kept at probability 0."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.where(z <= FLOOR / max(temperature, 1e-6), -np.inf, z)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float64)


def label_mass(logprobs: Sequence[float]) -> float:
    """Total probability the model put on the answer words (1.0 when the backend constrained the output)."""
    return float(sum(math.exp(lp) for lp in logprobs if lp > FLOOR))


def fit_temperature(logits: ArrayLike, y: ArrayLike, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature that minimizes the negative log-likelihood of the true classes (Guo et al., 2017)."""
    z = np.asarray(logits, dtype=np.float64)
    target = np.asarray(y, dtype=np.int64)
    if len(target) == 0:
        return 1.0
    z = np.where(z <= FLOOR, FLOOR, z)

    def nll(log_t: float) -> float:
        p = softmax(z, math.exp(log_t))[np.arange(len(target)), target]
        return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))

    result = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded")
    return float(math.exp(result.x))


@dataclass
class LLMCore(VoterCore):
    """Votes under the name `llm`: temperature-scaled class probabilities, or an abstention with its reason.

    It abstains when the abstain word wins, and when the output is invalid: no answer from the backend, or
    less than `min_label_mass` of the model's probability on the answer words (counted in `counts`).
    """

    scorer: Scorer
    names: tuple[str, ...]
    version: str
    temperature: float = 1.0
    min_label_mass: float = 0.5
    counts: OutputCounts = field(default_factory=OutputCounts)
    voters: Sequence[str] = (VOTER,)

    def opinion(self, logprobs: list[float] | None) -> Opinion:
        """One text's opinion from its answer-word log-probabilities (classes in order, then abstain)."""
        self.counts.scored += 1
        k = len(self.names)
        if logprobs is None or len(logprobs) != k + 1:
            self.counts.invalid += 1
            return Opinion(None, INVALID, evidence=("llm:no valid answer",))
        mass = label_mass(logprobs)
        if mass < self.min_label_mass:
            self.counts.invalid += 1
            return Opinion(None, INVALID, evidence=(f"llm:answer-word mass {mass:.2f} < {self.min_label_mass}",))
        raw = np.asarray(logprobs, dtype=np.float64)
        if int(np.argmax(raw)) == k:
            self.counts.unsure += 1
            p_unsure = float(softmax(raw[None, :])[0, k])
            return Opinion(None, UNSURE, evidence=(f"llm:abstain word p={p_unsure:.2f}",))
        probs = softmax(raw[None, :k], self.temperature)[0]
        return Opinion(
            {name: float(p) for name, p in zip(self.names, probs, strict=True)},
            evidence=(f"llm:answer={self.names[int(np.argmax(probs))]}", f"llm:mass={mass:.2f}"),
        )

    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        """One opinion per text, from one batched call to the backend."""
        scores = self.scorer.score(list(texts)) if texts else []
        if len(scores) != len(texts):
            raise RuntimeError(f"the LLM backend answered {len(scores)} of {len(texts)} texts")
        return {VOTER: [self.opinion(s) for s in scores]}

    def class_probabilities(self, texts: Sequence[str]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
        """(n, k) calibrated class probabilities (rows of NaN where it abstains) and the abstention mask."""
        opinions = self.predict(texts)[VOTER]
        out = np.full((len(texts), len(self.names)), np.nan)
        for i, op in enumerate(opinions):
            if op.probabilities is not None:
                out[i] = [op.probabilities[n] for n in self.names]
        return out, np.array([op.abstains for op in opinions], dtype=bool)
