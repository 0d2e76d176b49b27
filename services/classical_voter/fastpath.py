"""A lean replay of fitted scikit-learn objects at predict time: the same numbers without per-call checks.

`CalibratedClassifierCV.predict_proba` validates its input a dozen times per call (per calibrated
classifier, estimator and calibrator), which costs milliseconds even for one text. For linear estimators
with sigmoid or isotonic calibrators the math is a matrix product, an elementwise map and a mean, so
`FastCalibrated` takes the fitted parameters once and redoes that math in the order sklearn does it.
Anything it does not know is left to sklearn: `FastCalibrated.compile` returns None.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.special import expit
from sklearn.calibration import CalibratedClassifierCV, _CalibratedClassifier, _SigmoidCalibration
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion
from sklearn.svm import LinearSVC

Array = NDArray[np.float64]

# Exact types, never isinstance: a subclass may override the very method whose math is replayed here.
LINEAR_ESTIMATORS = (LogisticRegression, LinearSVC)
# sklearn's last step in `_CalibratedClassifier.predict_proba`: probabilities barely above 1 become 1.
OVERSHOOT = 1e-5


class Calibration(Protocol):
    def __call__(self, scores: Array) -> Array:
        """Calibrated positive-class probabilities (m, n, c) from decision scores (m, n, c)."""
        ...


@dataclass(frozen=True, eq=False)
class Sigmoid:
    """sklearn's `_SigmoidCalibration.predict`: expit(-(a * score + b)), with a and b as (m, c)."""

    a: Array
    b: Array

    def __call__(self, scores: Array) -> Array:
        out: Array = expit(-(self.a[:, None, :] * scores + self.b[:, None, :]))
        return out


@dataclass(frozen=True, eq=False)
class Isotonic:
    """`IsotonicRegression(out_of_bounds="clip").predict` per member and column: clip, then interpolate.

    scipy's interp1d hands float64 data to np.interp, so this is the same computation.
    """

    maps: tuple[tuple[tuple[float, float, Array, Array], ...], ...]  # [member][column] = (lo, hi, x, y)

    def __call__(self, scores: Array) -> Array:
        out = np.empty_like(scores)
        for i, member in enumerate(self.maps):
            for j, (lo, hi, x, y) in enumerate(member):
                out[i, :, j] = np.interp(np.clip(scores[i, :, j], lo, hi), x, y)
        return out


@dataclass(frozen=True, eq=False)
class FastCalibrated:
    """`CalibratedClassifierCV.predict_proba` for linear estimators with sigmoid or isotonic calibrators.

    `weights` (n_features, m * c) holds the m calibrated classifiers' `coef_.T` side by side, c decision
    columns each (1 when binary, else one per class), so one sparse product scores every member.
    """

    source: CalibratedClassifierCV
    members: list[Any]  # source.calibrated_classifiers_ at compile time
    n_classes: int
    weights: Array
    intercepts: Array
    calibration: Calibration

    @classmethod
    def compile(cls, model: Any) -> FastCalibrated | None:
        """The fast path for a fitted calibrated model, or None when any part of it is of an unknown kind."""
        if type(model) is not CalibratedClassifierCV or not hasattr(model, "calibrated_classifiers_"):
            return None
        members = model.calibrated_classifiers_
        classes = np.asarray(model.classes_)
        columns = 1 if len(classes) == 2 else len(classes)
        if not members or any(type(m) is not _CalibratedClassifier or len(m.calibrators) != columns for m in members):
            return None
        linear = [_linear(m.estimator, classes, columns) for m in members]
        methods = {m.method for m in members}
        build = CALIBRATIONS.get(methods.pop()) if len(methods) == 1 else None
        calibration = build([m.calibrators for m in members]) if build is not None else None
        if calibration is None or any(part is None for part in linear):
            return None
        coefs, intercepts = zip(*(part for part in linear if part is not None), strict=True)
        weights = np.ascontiguousarray(np.vstack(coefs).T)
        return cls(model, members, len(classes), weights, np.concatenate(intercepts), calibration)

    def serves(self, model: Any) -> bool:
        """Whether this was compiled from `model` as it is now (not swapped, not refitted since)."""
        return model is self.source and model.calibrated_classifiers_ is self.members

    def predict_proba(self, x: Any) -> Array:
        """Class probabilities (n, k), equal to `source.predict_proba(x)`.

        Unlike sklearn it does not check `x` for NaN or infinity: it is meant for the features' own output.
        """
        if x.ndim != 2 or x.shape[1] != self.weights.shape[0]:
            raise ValueError(f"X has shape {x.shape}, but the model expects {self.weights.shape[0]} features")
        n, members = x.shape[0], len(self.members)
        scores = np.asarray(x @ self.weights) + self.intercepts
        # (m, n, c), C-ordered so each row is reduced in the same order as sklearn's own (n, k) arrays
        by_member = np.ascontiguousarray(scores.reshape(n, members, -1).transpose(1, 0, 2))
        proba = self._complete(self.calibration(by_member))
        proba[(proba > 1.0) & (proba <= 1.0 + OVERSHOOT)] = 1.0
        mean = np.zeros((n, self.n_classes))
        for member in proba:
            mean += member
        mean /= members
        return mean

    def _complete(self, calibrated: Array) -> Array:
        """Per member: the binary complement, or the multiclass rows normalized as sklearn does."""
        if self.n_classes == 2:
            positive = calibrated[:, :, 0]
            return np.stack([1.0 - positive, positive], axis=2)
        denominator = np.sum(calibrated, axis=2)[:, :, np.newaxis]
        # sklearn's edge case: when every calibrator says 0 for a row, the row is uniform
        uniform = np.full_like(calibrated, 1 / self.n_classes)
        out: Array = np.divide(calibrated, denominator, out=uniform, where=denominator != 0)
        return out


def compile_all(models: Mapping[str, Any]) -> dict[str, FastCalibrated]:
    """The fast path of every model that has one."""
    compiled = {name: FastCalibrated.compile(model) for name, model in models.items()}
    return {name: fast for name, fast in compiled.items() if fast is not None}


def _linear(estimator: Any, classes: NDArray[Any], columns: int) -> tuple[Array, Array] | None:
    """coef_ (c, n_features) and intercept_ (c,) of a known linear estimator fitted on every class."""
    if type(estimator) not in LINEAR_ESTIMATORS or not np.array_equal(estimator.classes_, classes):
        return None
    coef = np.asarray(estimator.coef_)
    if coef.dtype != np.float64 or coef.ndim != 2 or coef.shape[0] != columns:
        return None
    return coef, np.broadcast_to(np.asarray(estimator.intercept_, dtype=np.float64), (columns,))


def _sigmoid(calibrators: Sequence[Sequence[Any]]) -> Sigmoid | None:
    if not all(type(c) is _SigmoidCalibration for member in calibrators for c in member):
        return None
    a = np.array([[c.a_ for c in member] for member in calibrators], dtype=np.float64)
    b = np.array([[c.b_ for c in member] for member in calibrators], dtype=np.float64)
    return Sigmoid(a, b)


def _isotonic(calibrators: Sequence[Sequence[Any]]) -> Isotonic | None:
    maps = []
    for member in calibrators:
        if not all(type(c) is IsotonicRegression and c.out_of_bounds == "clip" for c in member):
            return None
        row = tuple((float(c.X_min_), float(c.X_max_), c.X_thresholds_, c.y_thresholds_) for c in member)
        # np.interp needs strictly increasing float64 knots to match interp1d exactly
        if not all(x.dtype == y.dtype == np.float64 and np.all(np.diff(x) > 0) for _, _, x, y in row):
            return None
        maps.append(row)
    return Isotonic(tuple(maps))


CALIBRATIONS: dict[str, Callable[[Sequence[Sequence[Any]]], Calibration | None]] = {
    "sigmoid": _sigmoid,
    "isotonic": _isotonic,
}


def transform_features(features: FeatureUnion, texts: list[str]) -> Any:
    """`features.transform(texts)`, calling plain TF-IDF parts directly instead of through joblib."""
    parts = [part for _, part in features.transformer_list]
    if features.transformer_weights or not all(type(part) is TfidfVectorizer for part in parts):
        return features.transform(texts)
    # what FeatureUnion itself returns when its parts are sparse
    return sparse.hstack([part.transform(texts) for part in parts]).tocsr()
