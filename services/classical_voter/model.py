"""The classical voter's core: shared TF-IDF features feeding two calibrated linear models."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Mapping, Sequence, Sized
from functools import partial
from typing import Any, Self

import numpy as np
from flockwatch.classical_voter.fastpath import FastCalibrated, FastFeatures, compile_all, transform_features
from flockwatch.common.metrics import expected_calibration_error
from flockwatch.common.voting import Opinion
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import NotFittedError
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import FeatureUnion
from sklearn.svm import LinearSVC

VOTERS = ("tfidf_lr", "tfidf_svm")
METHODS = ("sigmoid", "isotonic")
# Below this many examples in the smallest class a held-out comparison of calibrators is noise, and
# isotonic regression overfits: use sigmoid without comparing.
MIN_CLASS_FOR_CHOICE = 5

Calibration = str | Mapping[str, str]


class TrainingDataError(ValueError):
    """Training texts and labels cannot be used (lengths differ, too few classes or examples)."""


def make_features() -> FeatureUnion:
    """Word 1–2-gram and char_wb 2–5-gram TF-IDF, side by side."""
    return FeatureUnion(
        [
            ("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
        ]
    )


def check_training(texts: Sized, y: Sequence[str], min_per_class: int) -> Counter[str]:
    """The class counts; raises TrainingDataError when texts (or feature rows) and labels cannot be used."""
    if len(texts) != len(y):
        raise TrainingDataError(f"{len(texts)} texts but {len(y)} labels")
    counts = Counter(y)
    if len(counts) < 2:
        raise TrainingDataError(f"need at least 2 classes; got {sorted(counts)}")
    rare = sorted(c for c, n in counts.items() if n < min_per_class)
    if rare:
        raise TrainingDataError(f"classes with fewer than {min_per_class} examples: {rare}")
    return counts


class ClassicalModel(BaseEstimator):  # type: ignore[misc,unused-ignore]  # sklearn is untyped
    """TF-IDF features fitted once, shared by a calibrated logistic regression and a calibrated linear SVM.

    `calibration` is "auto" (choose sigmoid or isotonic per model by ECE on a stratified held-out part
    of the training data, then refit on all of it), one method for both models, or a {voter: method} map.
    """

    def __init__(
        self,
        lr_c: float = 10.0,
        svm_c: float = 1.0,
        calibration: Calibration = "auto",
        cv: int = 5,
        holdout: float = 0.2,
        random_state: int = 0,
        n_jobs: int | None = None,
    ) -> None:
        self.lr_c = lr_c
        self.svm_c = svm_c
        self.calibration = calibration
        self.cv = cv
        self.holdout = holdout
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, texts: Sequence[str], y: Sequence[str]) -> Self:
        """Fit the features once, choose calibration per model, and fit both calibrated models."""
        counts = check_training(texts, y, min_per_class=2)
        labels = np.asarray(y, dtype=object)
        self.classes_: list[str] = sorted(counts)
        self.voters_: list[str] = list(VOTERS)
        self.features_: FeatureUnion = make_features()
        x = self.features_.fit_transform(list(texts))
        self.methods_, choice = self._choose_methods(x, labels, min(counts.values()))
        self.models_: dict[str, CalibratedClassifierCV] = {
            v: self._calibrated(v, self.methods_[v], min(counts.values())).fit(x, labels) for v in VOTERS
        }
        self._fast = compile_all(self.models_)
        self._fast_features = FastFeatures.compile(self.features_)
        self.report_: dict[str, Any] = {
            "n_train": len(labels),
            "n_features": int(x.shape[1]),
            "classes": self.classes_,
            "calibration": choice,
        }
        return self

    def predict_proba_all(self, texts: Sequence[str]) -> dict[str, NDArray[np.float64]]:
        """Class probabilities (n, k) in `classes_` order from every model, with one feature transform."""
        self._check_fitted()
        if len(texts) == 0:
            return {v: np.empty((0, len(self.classes_))) for v in self.voters_}
        x = self._transform(list(texts))
        return {v: normalized(self._predict_proba(v, x)) for v in self.voters_}

    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        """One `Opinion` per text from every model."""
        return {
            voter: [
                Opinion(probabilities=dict(zip(self.classes_, map(float, row), strict=True)), evidence=(voter,))
                for row in probs
            ]
            for voter, probs in self.predict_proba_all(texts).items()
        }

    def oof_proba(
        self,
        texts: Sequence[str],
        y: Sequence[str],
        n_splits: int = 5,
        seed: int = 0,
        folds: NDArray[np.int64] | None = None,
    ) -> dict[str, NDArray[np.float64]]:
        """Out-of-fold probabilities per model: each fold fits a fresh clone with the chosen calibration.

        `folds`: a fold number per text (the trainer's shared assignment); else stratified `n_splits` folds.
        """
        self._check_fitted()
        check_training(texts, y, min_per_class=n_splits)
        unknown = sorted(set(y) - set(self.classes_))
        if unknown:
            raise TrainingDataError(f"labels not among the fitted classes {self.classes_}: {unknown}")
        text_array, labels = np.asarray(list(texts), dtype=object), np.asarray(y, dtype=object)
        out = {v: np.full((len(labels), len(self.classes_)), np.nan) for v in self.voters_}
        if folds is None:
            splits = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(text_array, labels)
        else:
            splits = ((np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in np.unique(folds))
        for train, held_out in splits:
            fold_model = clone(self).set_params(calibration=dict(self.methods_))
            fold_model.fit(text_array[train].tolist(), labels[train].tolist())
            if fold_model.classes_ != self.classes_:
                raise TrainingDataError("a fold lost a class; the OOF data must hold every fitted class")
            for voter, probs in fold_model.predict_proba_all(text_array[held_out].tolist()).items():
                out[voter][held_out] = probs
        return out

    def _transform(self, texts: list[str]) -> Any:
        """sklearn's features, through the fast path when they have one (see fastpath.py)."""
        fast: FastFeatures | None = getattr(self, "_fast_features", None)
        if fast is not None and fast.serves(self.features_):
            return fast.transform(texts)
        return transform_features(self.features_, texts)

    def _predict_proba(self, voter: str, x: Any) -> NDArray[np.float64]:
        """sklearn's probabilities, through the fast path when the model has one (see fastpath.py)."""
        model = self.models_[voter]
        fast: FastCalibrated | None = getattr(self, "_fast", {}).get(voter)
        if fast is not None and fast.serves(model):
            return fast.predict_proba(x)
        out: NDArray[np.float64] = model.predict_proba(x)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # The fast paths are derived from features_ and models_: rebuilt on load rather than stored twice.
        state = dict(super().__getstate__())
        state.pop("_fast", None)
        state.pop("_fast_features", None)
        if "features_" in state:  # each vocabulary as one array: skops writes a dict key by key (7x slower loads)
            state["features_"], state["vocabularies_"] = _vocabularies_out(state["features_"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        vocabularies = state.pop("vocabularies_", None)
        if vocabularies is not None:
            state["features_"] = _vocabularies_in(state["features_"], vocabularies)
        super().__setstate__(state)
        if hasattr(self, "models_"):
            self._fast = compile_all(self.models_)
            self._fast_features = FastFeatures.compile(self.features_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "models_"):
            raise NotFittedError("ClassicalModel is not fitted; call fit(texts, labels) first")

    def _base(self, voter: str) -> BaseEstimator:
        if voter == "tfidf_lr":
            # newton-cg: same optimum as lbfgs on these sparse features, about 8x faster here.
            return LogisticRegression(C=self.lr_c, solver="newton-cg", max_iter=2000)
        return LinearSVC(C=self.svm_c, max_iter=10_000)

    def _calibrated(self, voter: str, method: str, smallest_class: int) -> CalibratedClassifierCV:
        folds = StratifiedKFold(n_splits=min(self.cv, smallest_class), shuffle=True, random_state=self.random_state)
        return CalibratedClassifierCV(self._base(voter), method=method, cv=folds, n_jobs=self.n_jobs)

    def _choose_methods(
        self, x: Any, y: NDArray[Any], smallest_class: int
    ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """Each model's calibration method, and what the choice was based on."""
        if not isinstance(self.calibration, str):
            fixed = dict(self.calibration)
            if set(fixed) != set(VOTERS) or not set(fixed.values()) <= set(METHODS):
                raise ValueError(f"calibration map must give one of {METHODS} for each of {VOTERS}: {fixed}")
            return fixed, {v: {"method": m, "reason": "given"} for v, m in fixed.items()}
        if self.calibration in METHODS:
            return dict.fromkeys(VOTERS, self.calibration), {
                v: {"method": self.calibration, "reason": "given"} for v in VOTERS
            }
        if self.calibration != "auto":
            raise ValueError(f"calibration must be 'auto', one of {METHODS}, or a map; got {self.calibration!r}")
        if smallest_class < MIN_CLASS_FOR_CHOICE:
            reason = f"smallest class has {smallest_class} < {MIN_CLASS_FOR_CHOICE} examples"
            return dict.fromkeys(VOTERS, "sigmoid"), {v: {"method": "sigmoid", "reason": reason} for v in VOTERS}
        return self._compare_methods(x, y)

    def _compare_methods(self, x: Any, y: NDArray[Any]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """ECE of each method per model on a stratified held-out part; the lowest wins (ties: sigmoid)."""
        methods: dict[str, str] = {}
        choice: dict[str, dict[str, Any]] = {}
        for voter in VOTERS:
            calibrated = partial(self._calibrated, voter)
            choice[voter] = compare_methods(calibrated, x, y, self.classes_, self.holdout, self.random_state)
            methods[voter] = choice[voter]["method"]
        return methods, choice


def compare_methods(
    calibrated: Callable[[str, int], CalibratedClassifierCV],
    x: Any,
    y: NDArray[Any],
    classes: Sequence[str],
    holdout: float,
    random_state: int,
    methods: Sequence[str] = METHODS,
) -> dict[str, Any]:
    """ECE of each calibration method on a stratified held-out part; the lowest wins (ties: the first).

    `calibrated(method, smallest_class)` builds the unfitted calibrated model.
    """
    x_fit, x_held, y_fit, y_held = train_test_split(x, y, test_size=holdout, stratify=y, random_state=random_state)
    index = {c: i for i, c in enumerate(classes)}
    held_index = np.array([index[label] for label in y_held])
    smallest = min(Counter(y_fit.tolist()).values())
    ece = {
        m: expected_calibration_error(calibrated(m, smallest).fit(x_fit, y_fit).predict_proba(x_held), held_index)
        for m in methods
    }
    method = min(methods, key=lambda m: ece[m])
    return {"method": method, "reason": "lowest held-out ECE", "ece": ece, "n_held_out": len(y_held)}


def normalized(probs: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rows rescaled to sum to 1 (calibrators can drift by rounding)."""
    probs = np.asarray(probs, dtype=np.float64)
    out: NDArray[np.float64] = probs / probs.sum(axis=1, keepdims=True)
    return out


def _vocabularies_out(features: FeatureUnion) -> tuple[FeatureUnion, list[NDArray[np.str_]]]:
    """A copy of `features` whose vectorizers hold no `vocabulary_`, and each vocabulary's terms in column order."""
    union = copy.copy(features)
    union.transformer_list, terms = [], []
    for name, vectorizer in features.transformer_list:
        bare = copy.copy(vectorizer)
        vocabulary = bare.__dict__.pop("vocabulary_")
        order = np.empty(len(vocabulary), dtype=object)
        for term, column in vocabulary.items():
            order[column] = term
        terms.append(order.astype(str))
        union.transformer_list.append((name, bare))
    return union, terms


def _vocabularies_in(features: FeatureUnion, terms: list[NDArray[np.str_]]) -> FeatureUnion:
    """`features` with each vectorizer's `vocabulary_` rebuilt from its terms (see `_vocabularies_out`)."""
    for (_, vectorizer), order in zip(features.transformer_list, terms, strict=True):
        vectorizer.vocabulary_ = {term: column for column, term in enumerate(order.tolist())}
    return features
