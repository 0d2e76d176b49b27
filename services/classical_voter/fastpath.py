"""A lean replay of fitted scikit-learn objects at predict time: the same numbers without per-call checks.

`CalibratedClassifierCV.predict_proba` validates its input a dozen times per call (per calibrated
classifier, estimator and calibrator), which costs milliseconds even for one text. For linear estimators
with sigmoid or isotonic calibrators the math is a matrix product, an elementwise map and a mean, so
`FastCalibrated` takes the fitted parameters once and redoes that math in the order sklearn does it.

`TfidfVectorizer.transform` is the same story on the feature side: for one text about three quarters of
its time goes to validation (`check_array` and its dataframe probes, `normalize`'s checks, scipy's format
checks on every intermediate matrix), not to the text. `FastTfidf` keeps the vectorizer's own analyzer and
vocabulary, counts terms as `CountVectorizer._count_vocab` does, and applies `TfidfTransformer.transform`'s
steps on the bare CSR arrays (sublinear tf, idf, then sklearn's own Cython row normalizer), so the result
is bit for bit what sklearn returns; `FastFeatures` puts the parts of a `FeatureUnion` side by side as
`FeatureUnion.transform` does.

Anything these do not know is left to sklearn: `compile` returns None. Types are checked exactly, never
with isinstance, and `serves` tells whether the fitted object has changed since it was compiled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, NamedTuple, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.special import expit
from sklearn.calibration import CalibratedClassifierCV, _CalibratedClassifier, _SigmoidCalibration
from sklearn.feature_extraction.text import TfidfTransformer, TfidfVectorizer
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion
from sklearn.svm import LinearSVC
from sklearn.utils.sparsefuncs_fast import _inplace_csr_row_normalize_l1, _inplace_csr_row_normalize_l2

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


# What `TfidfVectorizer.transform` reads from the vectorizer itself: the analyzer's parameters, `binary` and
# `dtype`. (max_df, min_df, max_features and vocabulary only matter when fitting.)
TRANSFORM_PARAMS = (
    "input",
    "encoding",
    "decode_error",
    "strip_accents",
    "lowercase",
    "preprocessor",
    "tokenizer",
    "analyzer",
    "stop_words",
    "token_pattern",
    "ngram_range",
    "binary",
    "dtype",
)
FLOAT_DTYPES = (np.float64, np.float32)
# sklearn's own in-place row normalizers (what `normalize(X, norm, copy=False)` calls for CSR input), on
# bare arrays: (data, shape, indices, indptr)
NORMALIZERS: dict[str, Callable[..., None]] = {
    "l1": _inplace_csr_row_normalize_l1,
    "l2": _inplace_csr_row_normalize_l2,
}
INT32_MAX = int(np.iinfo(np.int32).max)
OUT_OF_VOCABULARY = -1  # not a column: compile checks that the vocabulary's columns are 0 .. n - 1


class Rows(NamedTuple):
    """The arrays of a CSR matrix, without scipy's object (and its format checks) around them."""

    data: NDArray[Any]
    indices: NDArray[np.int32]
    indptr: NDArray[np.int32]


def _vectorizer_state(vectorizer: TfidfVectorizer) -> tuple[Any, ...]:
    """Everything `vectorizer.transform` depends on; compared by identity, as set_params and fit replace them."""
    tfidf = vectorizer._tfidf
    fitted = (vectorizer.vocabulary_, tfidf, getattr(tfidf, "idf_", None), tfidf.norm, tfidf.sublinear_tf)
    return fitted + tuple(getattr(vectorizer, name) for name in TRANSFORM_PARAMS)


@dataclass(frozen=True, eq=False)
class FastTfidf:
    """`TfidfVectorizer.transform`, step by step as sklearn does it, on bare CSR arrays.

    `CountVectorizer._count_vocab`: the vectorizer's own analyzer, its vocabulary's column per known
    term, the counts in `dtype`, columns sorted within each row. `CountVectorizer.transform`: all ones
    when binary. `TfidfTransformer.transform`: log(count) + 1 when sublinear, times `idf_` per column
    when fitted with idf, then each row divided by its l1 or l2 norm. Indices are int32, as sklearn's
    below 2**31 stored entries. Unlike sklearn it takes an empty batch (and returns no rows).
    """

    source: TfidfVectorizer
    state: tuple[Any, ...]  # _vectorizer_state(source) at compile time
    analyze: Callable[[str], list[str]]
    vocabulary: Mapping[str, int]
    dtype: np.dtype[Any]
    binary: bool
    sublinear_tf: bool
    idf: NDArray[Any] | None
    normalize: Callable[..., None] | None

    @classmethod
    def compile(cls, vectorizer: Any) -> FastTfidf | None:
        """The fast path for a fitted TF-IDF vectorizer, or None when it is of an unknown kind or state."""
        if type(vectorizer) is not TfidfVectorizer or type(getattr(vectorizer, "_tfidf", None)) is not TfidfTransformer:
            return None
        tfidf, vocabulary = vectorizer._tfidf, getattr(vectorizer, "vocabulary_", None)
        # sklearn refuses these at transform time (not fitted, empty or broken vocabulary): let it say so
        if type(vocabulary) is not dict or not vocabulary or getattr(tfidf, "n_features_in_", None) != len(vocabulary):
            return None
        if set(vocabulary.values()) != set(range(len(vocabulary))) or len(vocabulary) > INT32_MAX:
            return None
        # float64 or float32 as such, not a spelling sklearn would warn about and convert
        if vectorizer.dtype not in FLOAT_DTYPES or (tfidf.norm is not None and tfidf.norm not in NORMALIZERS):
            return None
        try:
            analyze = vectorizer.build_analyzer()
        except ValueError:  # an unknown analyzer name
            return None
        idf = getattr(tfidf, "idf_", None)
        if idf is not None and (
            type(idf) is not np.ndarray or idf.shape != (len(vocabulary),) or idf.dtype.kind != "f"
        ):
            return None
        normalize = None if tfidf.norm is None else NORMALIZERS[tfidf.norm]
        state = _vectorizer_state(vectorizer)
        binary, sublinear_tf = bool(vectorizer.binary), bool(tfidf.sublinear_tf)
        return cls(
            vectorizer, state, analyze, vocabulary, np.dtype(vectorizer.dtype), binary, sublinear_tf, idf, normalize
        )

    @property
    def width(self) -> int:
        return len(self.vocabulary)

    def serves(self, vectorizer: Any) -> bool:
        """Whether this was compiled from `vectorizer` as it is now (not refitted or reconfigured since)."""
        if vectorizer is not self.source:
            return False
        return all(now is then for now, then in zip(_vectorizer_state(vectorizer), self.state, strict=True))

    def transform(self, docs: Sequence[str]) -> sparse.csr_matrix:
        """The TF-IDF matrix (n, width), equal to `source.transform(docs)` in structure, dtype and every bit."""
        rows = self.rows(docs)
        return sparse.csr_matrix((rows.data, rows.indices, rows.indptr), shape=(len(rows.indptr) - 1, self.width))

    def rows(self, docs: Sequence[str]) -> Rows:
        """The arrays of `transform(docs)`."""
        if isinstance(docs, str):
            raise ValueError("Iterable over raw text documents expected, string object received.")
        rows = self.counts(docs)
        data = rows.data
        if self.binary:
            data.fill(1)
        if self.sublinear_tf:
            np.log(data, out=data)
            data += 1.0
        if self.idf is not None:
            data *= self.idf[rows.indices]
        if self.normalize is not None:
            self.normalize(data, (len(rows.indptr) - 1, self.width), rows.indices, rows.indptr)
        return rows

    def counts(self, docs: Sequence[str]) -> Rows:
        """Per document, the vocabulary's columns (ascending) and how often each term occurs, in `dtype`."""
        column = self.vocabulary.get
        columns: list[int] = []
        counts: list[int] = []
        indptr = [0]
        for doc in docs:
            found = Counter(map(column, self.analyze(doc), repeat(OUT_OF_VOCABULARY)))
            found.pop(OUT_OF_VOCABULARY, None)
            row = sorted(found)
            columns.extend(row)
            counts.extend(map(found.__getitem__, row))
            indptr.append(len(columns))
        return Rows(
            np.array(counts, dtype=self.dtype), np.array(columns, dtype=np.int32), np.array(indptr, dtype=np.int32)
        )


@dataclass(frozen=True, eq=False)
class FastFeatures:
    """`FeatureUnion.transform` for an unweighted union of TF-IDF vectorizers: each row is the parts' rows in order.

    That is what sklearn's `sparse.hstack(parts).tocsr()` holds, built here with one scipy matrix, not three.
    """

    source: FeatureUnion
    parts: list[tuple[str, Any]]  # source.transformer_list at compile time
    fast: tuple[FastTfidf, ...]

    @classmethod
    def compile(cls, features: Any) -> FastFeatures | None:
        """The fast path for a fitted union of TF-IDF vectorizers, or None when any part is of an unknown kind."""
        if type(features) is not FeatureUnion or features.transformer_weights or not features.transformer_list:
            return None
        fast = tuple(FastTfidf.compile(part) for _, part in features.transformer_list)
        if any(f is None for f in fast):
            return None
        compiled = tuple(f for f in fast if f is not None)
        if len({f.dtype for f in compiled}) != 1 or sum(f.width for f in compiled) > INT32_MAX:
            return None
        return cls(features, list(features.transformer_list), compiled)

    def serves(self, features: Any) -> bool:
        """Whether this was compiled from `features` as it is now (same parts, each as it was)."""
        if features is not self.source or features.transformer_weights:
            return False
        now = features.transformer_list
        if len(now) != len(self.parts) or any(a is not b for (_, a), (_, b) in zip(now, self.parts, strict=True)):
            return False
        return all(f.serves(part) for f, (_, part) in zip(self.fast, now, strict=True))

    def transform(self, texts: Sequence[str]) -> sparse.csr_matrix:
        """The features (n, total width), equal to `source.transform(texts)` in structure, dtype and every bit."""
        parts = [f.rows(texts) for f in self.fast]
        n = len(texts)
        lengths = [np.diff(part.indptr) for part in parts]
        indptr = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(sum(lengths), out=indptr[1:])
        data = np.empty(indptr[-1], dtype=self.fast[0].dtype)
        indices = np.empty(indptr[-1], dtype=np.int32)
        start = indptr[:-1].copy()  # per row: where the next part's entries go
        offset = 0
        for part, length, f in zip(parts, lengths, self.fast, strict=True):
            # an entry moves from its place in the part to the same place relative to its row's `start`
            target = np.arange(len(part.data)) + np.repeat(start - part.indptr[:-1], length)
            data[target] = part.data
            indices[target] = part.indices + offset
            start += length
            offset += f.width
        return sparse.csr_matrix((data, indices, indptr), shape=(n, offset))
