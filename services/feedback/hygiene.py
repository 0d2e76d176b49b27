"""Feedback hygiene: likely label errors among corrections, by confident learning over out-of-fold probabilities.

The probabilities come from a TF-IDF + logistic-regression model fitted on the corrections themselves with
K-fold cross-validation, never from the deployed ensemble: corrections that consistently fix a systematic
error of the ensemble are learnt from the other folds and stay; a label that disagrees with what the other
corrections say about similar texts is flagged. cleanlab's `find_label_issues` does the confident learning.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import FeatureUnion, make_pipeline

METHOD = "cleanlab.find_label_issues(prune_by_noise_rate) over out-of-fold TF-IDF+LR probabilities"


@dataclass(frozen=True)
class LabelIssue:
    """A row whose given label the out-of-fold model finds unlikely."""

    index: int
    given: str
    suggested: str
    quality: float  # the out-of-fold probability of the given label (self-confidence)


@dataclass(frozen=True)
class HygieneReport:
    """What a check found; `skipped` says why nothing was checked."""

    method: str
    rows: int
    folds: int
    issues: list[LabelIssue] = field(default_factory=list)
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "method": self.method,
            "rows": self.rows,
            "folds": self.folds,
            "skipped": self.skipped,
            "issues": [vars(i) for i in self.issues],
        }


def _model(seed: int) -> Any:
    features = FeatureUnion(
        [
            ("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=1)),
        ]
    )
    return make_pipeline(features, LogisticRegression(C=4.0, max_iter=2000, random_state=seed))


def out_of_fold_probabilities(
    texts: Sequence[str], y: NDArray[np.int64], folds: int, seed: int = 0
) -> NDArray[np.float64]:
    """(n, k) probabilities, each row from a model that never saw that row."""
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs: NDArray[np.float64] = cross_val_predict(_model(seed), list(texts), y, cv=cv, method="predict_proba")
    return probs


def find_issues(
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    protected: Sequence[bool] | None = None,
    folds: int = 5,
    min_rows: int = 20,
    seed: int = 0,
) -> HygieneReport:
    """Likely label errors among (text, label) rows; `protected` rows (confirmed by several people) never are."""
    n = len(texts)
    counts = Counter(labels)
    k = min(folds, min(counts.values(), default=0))
    if n < min_rows:
        return HygieneReport(METHOD, n, 0, skipped=f"{n} labelled texts; the check needs at least {min_rows}")
    if len(counts) < 2 or k < 2:
        return HygieneReport(METHOD, n, 0, skipped=f"needs two classes with at least 2 texts each; have {dict(counts)}")
    classes = sorted(counts)
    y = np.array([classes.index(label) for label in labels], dtype=np.int64)
    probs = out_of_fold_probabilities(texts, y, k, seed)
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about small classes; the result is still usable
        flagged = find_label_issues(labels=y, pred_probs=probs, filter_by="prune_by_noise_rate")
    keep = np.ones(n, dtype=bool) if protected is None else ~np.asarray(protected, dtype=bool)
    issues = [
        LabelIssue(i, labels[i], classes[int(probs[i].argmax())], round(float(probs[i, y[i]]), 4))
        for i in map(int, np.flatnonzero(np.asarray(flagged) & keep))
    ]
    issues.sort(key=lambda issue: issue.quality)
    return HygieneReport(METHOD, n, k, issues)
