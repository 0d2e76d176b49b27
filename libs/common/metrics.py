"""Evaluation metrics for probabilistic voters that may abstain: F1, calibration, risk-coverage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import f1_score

# A probability table: an (n, k) array whose abstained rows are NaN, or a sequence of rows with None for an
# abstention (what a list of `Opinion.probabilities` turns into).
ProbRows = NDArray[np.floating[Any]] | Sequence[Sequence[float] | NDArray[np.floating[Any]] | None]


def fit_temperature(
    logits: NDArray[np.floating[Any]], y: NDArray[np.integer[Any]], bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature T within `bounds` minimising the negative log-likelihood of softmax(logits / T) (searched
    in log T; Guo et al., 2017). Log-probabilities serve as logits: softmax(log p / T) is p sharpened or softened.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    z = np.asarray(logits, dtype=np.float64)
    rows, target = np.arange(len(z)), np.asarray(y, dtype=np.int64)

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, target].mean())

    found = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
    return float(np.exp(found.x))


def as_prob_matrix(probs: ProbRows, n_classes: int) -> NDArray[np.float64]:
    """An (n, k) float array from `probs`; rows that are None become NaN rows."""
    if isinstance(probs, np.ndarray):
        matrix = np.asarray(probs, dtype=np.float64)
    else:
        matrix = np.full((len(probs), n_classes), np.nan)
        for i, row in enumerate(probs):
            if row is not None:
                matrix[i] = np.asarray(row, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != n_classes:
        raise ValueError(f"probabilities must have shape (n, {n_classes}); got {matrix.shape}")
    return matrix


def has_opinion(probs: NDArray[np.floating[Any]]) -> NDArray[np.bool_]:
    """Rows that hold probabilities (no NaN): the texts where the voter did not abstain."""
    answered: NDArray[np.bool_] = ~np.isnan(probs).any(axis=1)
    return answered


def _calibration_bins(
    probs: ArrayLike, y: ArrayLike, n_bins: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """Share of rows and |accuracy - confidence| per non-empty top-label bin; None without scored rows."""
    p = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64)
    keep = has_opinion(p)
    p, labels = p[keep], labels[keep]
    if len(p) == 0:
        return None
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.digitize(confidence, edges[1:-1], right=True)
    used = np.unique(bins)
    weights = np.array([(bins == b).mean() for b in used])
    gaps = np.array([abs(correct[bins == b].mean() - confidence[bins == b].mean()) for b in used])
    return weights, gaps


def expected_calibration_error(probs: ArrayLike, y: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (lo, hi]; NaN rows (abstentions) are skipped."""
    binned = _calibration_bins(probs, y, n_bins)
    return float("nan") if binned is None else float((binned[0] * binned[1]).sum())


def maximum_calibration_error(probs: ArrayLike, y: ArrayLike, n_bins: int = 15) -> float:
    """Top-label MCE: the largest |accuracy - confidence| over the non-empty bins of the ECE."""
    binned = _calibration_bins(probs, y, n_bins)
    return float("nan") if binned is None else float(binned[1].max())


def brier_score(probs: ArrayLike, y: ArrayLike) -> float:
    """Multi-class Brier score: mean squared distance to the one-hot truth (0 best, 2 worst)."""
    p = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64)
    if len(p) == 0:
        return float("nan")
    onehot = np.eye(p.shape[1])[labels]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def risk_coverage(probs: ArrayLike, y: ArrayLike, thresholds: Sequence[float]) -> list[dict[str, float | None]]:
    """Coverage and error rate among answered texts when answering only where max probability ≥ t."""
    p = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64)
    valid = has_opinion(p)
    confidence = np.where(valid, np.nan_to_num(p).max(axis=1), -np.inf)
    correct = np.nan_to_num(p).argmax(axis=1) == labels
    rows: list[dict[str, float | None]] = []
    for t in thresholds:
        answered = valid & (confidence >= t)
        n_answered = int(answered.sum())
        rows.append(
            {
                "threshold": float(t),
                "coverage": n_answered / len(p) if len(p) else 0.0,
                "n_answered": n_answered,
                "selective_error": float(1.0 - correct[answered].mean()) if n_answered else None,
            }
        )
    return rows


def risk_coverage_curve(
    probs: ArrayLike, y: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(coverage, selective error, threshold) answering where max probability ≥ each distinct threshold."""
    # most confident threshold first; coverage counts all rows, NaN rows (abstentions) never answer
    p = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64)
    valid = has_opinion(p)
    confidence = p[valid].max(axis=1)
    wrong = p[valid].argmax(axis=1) != labels[valid]
    order = np.argsort(-confidence, kind="stable")
    confidence, wrong = confidence[order], wrong[order]
    # a threshold answers every row tied with it, so keep only the last row of each run of equal confidences
    last = np.r_[confidence[1:] != confidence[:-1], True] if len(confidence) else np.zeros(0, dtype=bool)
    answered = np.arange(1, len(confidence) + 1)[last]
    errors = np.cumsum(wrong)[last]
    return answered / max(len(p), 1), errors / answered, confidence[last]


def coverage_at_risk(probs: ArrayLike, y: ArrayLike, risk_target: float) -> float:
    """Largest coverage on the (in-sample) risk–coverage curve whose selective error is ≤ risk_target."""
    coverage, risk, _ = risk_coverage_curve(probs, y)
    ok = risk <= risk_target + 1e-12
    return float(coverage[ok].max()) if ok.any() else 0.0


def f1_by_class(y: NDArray[np.int64], pred: NDArray[np.int64], classes: list[str]) -> dict[str, float | None]:
    """F1 per class; None for a class that is neither in the truth nor predicted (undefined)."""
    if len(y) == 0:
        return dict.fromkeys(classes)
    scores = f1_score(y, pred, labels=list(range(len(classes))), average=None, zero_division=0.0)
    seen = set(y.tolist()) | set(pred.tolist())
    return {c: float(scores[i]) if i in seen else None for i, c in enumerate(classes)}


def macro_average(per_class: dict[str, float | None]) -> float | None:
    """Mean of the defined per-class scores; None when none is defined."""
    scores = [s for s in per_class.values() if s is not None]
    return float(np.mean(scores)) if scores else None


def or_none(value: float) -> float | None:
    """None for NaN (strict JSON has no NaN), else the value as a float."""
    return None if np.isnan(value) else float(value)


def classification_report(
    y_true: Sequence[str],
    probs: ProbRows | None,
    classes: list[str],
    answered: ArrayLike | None = None,
) -> dict[str, Any]:
    """Quality of one voter (or the ensemble) on labelled texts, as a JSON-ready dict.

    Rows of `probs` that are NaN or None are abstentions; `probs=None` means the voter abstained on every
    text. Accuracy, macro-F1, per-class F1, ECE and Brier use the rows with probabilities (`n_scored`).
    `answered` (optional) narrows those further to the texts a selective policy chose to answer;
    coverage, selective_error and macro_f1_answered use the answered rows (`n_answered`). Metrics
    that are undefined because no row qualifies are None; macro-F1 averages the classes that occur in
    the truth or the predictions.
    """
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(y_true) - index.keys())
    if unknown:
        raise ValueError(f"labels not among the classes {classes}: {unknown}")
    y = np.array([index[label] for label in y_true], dtype=np.int64)
    n = len(y)
    p = np.full((n, len(classes)), np.nan) if probs is None else as_prob_matrix(probs, len(classes))
    if len(p) != n:
        raise ValueError(f"{n} labels but {len(p)} probability rows")
    scored = has_opinion(p)
    chosen = scored if answered is None else scored & np.asarray(answered, dtype=bool)
    pred = np.nan_to_num(p).argmax(axis=1)
    per_class = f1_by_class(y[scored], pred[scored], classes)
    n_scored, n_answered = int(scored.sum()), int(chosen.sum())
    return {
        "n": n,
        "n_scored": n_scored,
        "n_answered": n_answered,
        "accuracy": float((pred[scored] == y[scored]).mean()) if n_scored else None,
        "macro_f1": macro_average(per_class),
        "per_class_f1": per_class,
        "ece": or_none(expected_calibration_error(p[scored], y[scored])),
        "brier": or_none(brier_score(p[scored], y[scored])),
        "coverage": n_answered / n if n else 0.0,
        "selective_error": float((pred[chosen] != y[chosen]).mean()) if n_answered else None,
        "macro_f1_answered": macro_average(f1_by_class(y[chosen], pred[chosen], classes)),
    }
