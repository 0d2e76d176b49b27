"""Split-conformal prediction sets with MAPIE, calibrated per group (Mondrian) with a pooled fallback.

The conformity scores are computed on the arbiter's *final* probabilities (consensus or stacker), so
the sets cover what the service decides. Groups are the slices of `slices.yaml` (a text may be in
several: its set is the union of their sets, which keeps each slice's guarantee; texts in no slice
form the group `_rest`) and, when asked, the true class (class-conditional: class c enters a text's set
when c is in the set of the calibrator fitted on class-c points). A group with fewer calibration points
than a finite quantile at 1 − α needs (⌈1/α⌉ − 1, i.e. 99 at α = 0.01) falls back to the next coarser
calibrator, ending at the pooled one; the report says which groups fell back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, ClassifierMixin

if TYPE_CHECKING:  # mapie is imported where calibrators are fitted or used, not by every arbiter import
    from mapie.classification import SplitConformalClassifier

Array = NDArray[np.float64]
ALL = "*"
REST = "_rest"
Key = tuple[str, str]  # (slice group or ALL, class name or ALL)


class GivenProbabilities(ClassifierMixin, BaseEstimator):
    """A prefit 'classifier' whose input is already the probability matrix: MAPIE scores the arbiter's output."""

    def __init__(self, n_classes: int = 2) -> None:
        self.n_classes = n_classes

    def fit(self, x: Array, y: Any = None) -> Self:
        """Nothing to learn; sets `classes_` for MAPIE."""
        self.classes_ = np.arange(self.n_classes)
        return self

    def predict_proba(self, x: Array) -> Array:
        """The input itself."""
        return np.asarray(x, dtype=np.float64)

    def predict(self, x: Array) -> NDArray[np.int64]:
        """The most probable class."""
        return np.asarray(np.asarray(x).argmax(axis=1), dtype=np.int64)


def _calibrate(p: Array, y: NDArray[np.int64], alpha: float, method: str, seed: int) -> SplitConformalClassifier:
    from mapie.classification import SplitConformalClassifier

    clf = SplitConformalClassifier(
        estimator=GivenProbabilities(p.shape[1]).fit(p),
        confidence_level=1 - alpha,
        conformity_score=method,
        prefit=True,
        random_state=seed,
    )
    with warnings.catch_warnings():  # MAPIE warns on small groups; the report records their sizes instead
        warnings.simplefilter("ignore", UserWarning)
        return clf.conformalize(p, y)


@dataclass
class MondrianSets:
    """Fitted calibrators per (group, class) key and which key serves each (group, class) pair."""

    alpha: float
    method: str
    by: tuple[str, ...]
    classes: list[str]
    groups: list[str]
    calibrators: dict[Key, SplitConformalClassifier] = field(default_factory=dict)
    route: dict[Key, Key] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        p: Array,
        y: NDArray[np.int64],
        memberships: Sequence[Sequence[str]],
        slices: Sequence[str],
        classes: list[str],
        alpha: float,
        method: str = "lac",
        by: Sequence[str] = ("slice",),
        min_points: int = 99,
        seed: int = 0,
    ) -> MondrianSets:
        """Calibrate on (n, k) probabilities `p` with true classes `y` and each text's slice memberships."""
        by_slice, by_class = "slice" in by, "class" in by
        if method != "lac" and (by_class or len(classes) < 3):  # MAPIE's check: lac alone fits one-class targets
            raise ValueError(f"conformity score {method!r} needs ≥ 3 classes and no per-class groups; use lac")
        groups = [*slices, REST] if by_slice else []
        member = _member_matrix(memberships, groups)
        sets = cls(alpha, method, tuple(by), list(classes), groups)
        rows: dict[Key, NDArray[np.bool_]] = {(ALL, ALL): np.ones(len(y), dtype=bool)}
        for g, group in enumerate(groups):
            rows[(group, ALL)] = member[:, g]
        for (group, _), mask in list(rows.items()) if by_class else []:
            for c, name in enumerate(classes):
                rows[(group, name)] = mask & (y == c)
        sizes = {key: int(mask.sum()) for key, mask in rows.items()}
        for key, mask in rows.items():
            if sizes[key] >= min_points or key == (ALL, ALL):
                sets.calibrators[key] = _calibrate(p[mask], y[mask], alpha, method, seed)
        for key in rows:
            sets.route[key] = next(k for k in _fallbacks(key) if k in sets.calibrators)
        sets.report = {
            "alpha": alpha,
            "method": method,
            "by": list(by),
            "min_points": min_points,
            "groups": {f"{g}|{c}": {"n": sizes[(g, c)], "calibrator": "|".join(sets.route[(g, c)])} for g, c in rows},
            "fallbacks": sorted(f"{g}|{c}" for (g, c) in rows if sets.route[(g, c)] != (g, c)),
        }
        return sets

    def predict_sets(self, p: Array, memberships: Sequence[Sequence[str] | None]) -> NDArray[np.bool_]:
        """(n, k) set membership: for each text, the union over its groups of each class's calibrated set."""
        n, k = p.shape
        out = np.zeros((n, k), dtype=bool)
        if n == 0:
            return out
        member = _member_matrix(memberships, self.groups)
        unknown = np.array([m is None for m in memberships], dtype=bool)  # text not seen: pooled calibrator
        per_group = [(g, member[:, i]) for i, g in enumerate(self.groups)] + [(ALL, unknown | (not self.groups))]
        cache: dict[Key, NDArray[np.bool_]] = {}
        for group, mask in per_group:
            if not mask.any():
                continue
            for c, name in enumerate(self.classes):
                key = self.route[(group, name if "class" in self.by else ALL)]
                if key not in cache:
                    cache[key] = self._sets(key, p)
                out[mask, c] |= cache[key][mask, c]
        return out

    def _sets(self, key: Key, p: Array) -> NDArray[np.bool_]:
        lac = self._lac_quantiles.get(key)
        if lac is not None:  # MAPIE's own rule for a prefit LAC score, without its per-call checks
            quantile, epsilon = lac
            return np.asarray(np.less_equal((1 - p)[:, :, None] - quantile, epsilon)[:, :, 0], dtype=bool)
        _, sets = self.calibrators[key].predict_set(p)
        return np.asarray(sets[:, :, 0], dtype=bool)

    @cached_property
    def _lac_quantiles(self) -> dict[Key, tuple[Array, np.float64]]:
        """The fitted quantile of each prefit LAC calibrator. MAPIE's `predict_set` validates its input and the
        probabilities (sums, label encoding) on every call, which cost the arbiter more than its own decision
        work on small batches; for the LAC score its set is `(1 − p) − q̂ ≤ ε` (`LACConformityScore.
        get_prediction_sets`, prefit), computed here with MAPIE's fitted q̂ and its own ε. Other scores go to
        MAPIE."""
        from mapie._machine_precision import EPSILON  # the tolerance MAPIE's LAC rule uses
        from mapie.conformity_scores import LACConformityScore

        out = {}
        for key, clf in self.calibrators.items():
            inner = getattr(clf, "_mapie_classifier", None)
            score: Any = getattr(inner, "conformity_score_function_", None)
            if type(score) is not LACConformityScore or getattr(inner, "cv", None) != "prefit":
                continue
            if getattr(score, "quantiles_", None) is None:  # MAPIE computes q̂ in its first predict_set
                clf.predict_set(np.full((1, len(self.classes)), 1 / len(self.classes)))
            out[key] = (np.asarray(score.quantiles_, dtype=np.float64), EPSILON)
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Plain state (what skops can write): the tuple-keyed maps as lists of pairs, the LAC cache left out."""
        state = {name: value for name, value in self.__dict__.items() if name != "_lac_quantiles"}
        state["calibrators"] = [[list(key), clf] for key, clf in self.calibrators.items()]
        state["route"] = [[list(key), list(to)] for key, to in self.route.items()]
        state["by"] = list(self.by)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["calibrators"] = {(key[0], key[1]): clf for key, clf in state["calibrators"]}
        state["route"] = {(key[0], key[1]): (to[0], to[1]) for key, to in state["route"]}
        state["by"] = tuple(state["by"])
        self.__dict__.update(state)

    @property
    def thresholds(self) -> dict[str, float]:
        """The conformity-score quantile of each fitted calibrator (what a decision's set was cut at)."""
        out = {}
        for key, clf in self.calibrators.items():
            q = getattr(clf._mapie_classifier.conformity_score_function_, "quantiles_", None)
            if q is not None:
                out["|".join(key)] = float(np.ravel(q)[0])
        return out


def _member_matrix(memberships: Sequence[Sequence[str] | None], groups: list[str]) -> NDArray[np.bool_]:
    """(n, g) bool: text i is in group j; texts in no slice are in REST; None (unknown text): in none."""
    index = {g: j for j, g in enumerate(groups)}
    out = np.zeros((len(memberships), len(groups)), dtype=bool)
    if not groups:
        return out
    for i, names in enumerate(memberships):
        if names is None:
            continue
        cols = [index[s] for s in names if s in index]
        out[i, cols or [index[REST]]] = True
    return out


def _fallbacks(key: Key) -> list[Key]:
    """The key itself, then the same class pooled over groups, then the group over classes, then everything."""
    group, name = key
    return list(dict.fromkeys([key, (ALL, name), (group, ALL), (ALL, ALL)]))


CALIBRATORS = "conformal.skops"  # the fitted sets of every plan, by plan name


def trusted_types() -> list[type]:
    """What conformal.skops may hold beyond what skops trusts by default: the sets and MAPIE's fitted objects."""
    from mapie.classification import SplitConformalClassifier, _MapieClassifier
    from mapie.conformity_scores import (
        APSConformityScore,
        LACConformityScore,
        NaiveConformityScore,
        RAPSConformityScore,
        TopKConformityScore,
    )
    from mapie.estimator.classifier import EnsembleClassifier

    scores = [APSConformityScore, LACConformityScore, NaiveConformityScore, RAPSConformityScore, TopKConformityScore]
    return [MondrianSets, GivenProbabilities, SplitConformalClassifier, _MapieClassifier, EnsembleClassifier, *scores]


def save_sets(sets: dict[str, MondrianSets], directory: Path) -> str:
    """Write the fitted sets of every plan (skops); returns the file name."""
    from flockwatch.common.artifacts import dump_skops

    dump_skops(sets, directory / CALIBRATORS)
    return CALIBRATORS


def load_sets(directory: Path) -> dict[str, MondrianSets]:
    """A verified bundle's fitted sets (rebuilt from skops with an allow-list of types; a pickle is refused)."""
    from flockwatch.common.artifacts import ArtifactError, load_skops

    sets = load_skops(directory, CALIBRATORS, trusted_types())
    if not isinstance(sets, dict) or not all(isinstance(s, MondrianSets) for s in sets.values()):
        raise ArtifactError(f"{directory}/{CALIBRATORS} does not hold the fitted sets of each plan")
    return sets
