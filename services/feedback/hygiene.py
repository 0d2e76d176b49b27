"""Feedback hygiene: likely label errors among corrections, weighed by how reliable each reviewer has been.

The evidence on each label is the mean of two probabilities: a TF-IDF + logistic-regression model fitted
on the corrections themselves with K-fold cross-validation (corrections that consistently fix a
systematic error of the ensemble are learnt from the other folds and stay), and the deployed ensemble's
own decision on the text where the feedback service has it (what the base data says about such texts).
cleanlab's `find_label_issues` does the confident learning on that evidence.

Reviewers differ: a one-coin Dawid–Skene model estimates each reviewer's accuracy from the evidence on all
their labels (EM, a Beta(4, 1) prior: reviewers are usually right) and gives each label its posterior of
being right. A label is flagged when that posterior is below one half (a reviewer whose labels the evidence
keeps contradicting, such as a poisoner, loses the benefit of the doubt), or when cleanlab flags it and the
posterior is below 0.9 (a reliable reviewer's isolated slip). On the poisoning scenario of
`tests/unit/test_feedback_model.py` (an honest reviewer correcting a spam campaign the model missed, a
poisoner labelling ordinary messages spam) it flags none of the honest reviewer's 90 labels and all 60 of
the poisoner's; cleanlab on the corrections alone flagged none of either.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import FeatureUnion, make_pipeline

METHOD = (
    "cleanlab.find_label_issues(prune_by_noise_rate) over out-of-fold TF-IDF+LR and deployed-ensemble "
    "probabilities, weighed by per-reviewer accuracy (one-coin Dawid-Skene)"
)
RELIABLE_PRIOR = (4.0, 1.0)  # Beta prior of a reviewer's accuracy: 0.8, worth five labels
DOUBT = 0.5  # a label whose posterior of being right is below this is flagged…
SLIP = 0.9  # …and one cleanlab flags, below this


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
    reviewers: dict[str, float] = field(default_factory=dict)  # estimated accuracy of each reviewer

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "method": self.method,
            "rows": self.rows,
            "folds": self.folds,
            "skipped": self.skipped,
            "reviewers": self.reviewers,
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


def reviewer_posteriors(
    right: NDArray[np.float64], reviewers: Sequence[str], k: int, iters: int = 100
) -> tuple[NDArray[np.float64], dict[str, float]]:
    """One-coin Dawid–Skene by EM: each label's posterior of being right and each reviewer's accuracy, from
    the evidence `right` (the probability of each given label) and who gave it, over `k` classes."""
    names = sorted(set(reviewers))
    who = np.array([names.index(r) for r in reviewers], dtype=np.int64)
    a_prior, b_prior = RELIABLE_PRIOR
    accuracy = np.full(len(names), a_prior / (a_prior + b_prior))
    evidence = np.clip(right, 1e-6, 1 - 1e-6)
    posterior = evidence
    for _ in range(iters):
        acc = accuracy[who]
        yes, no = acc * evidence, (1 - acc) * (1 - evidence) / max(k - 1, 1)
        posterior = yes / (yes + no)
        updated = (a_prior + np.bincount(who, posterior, len(names))) / (
            a_prior + b_prior + np.bincount(who, minlength=len(names))
        )
        if np.allclose(updated, accuracy, atol=1e-6):
            break
        accuracy = updated
    return posterior, {name: round(float(a), 4) for name, a in zip(names, accuracy, strict=True)}


def find_issues(
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    protected: Sequence[bool] | None = None,
    reviewers: Sequence[str] | None = None,
    deployed: Sequence[Mapping[str, float] | None] | None = None,
    folds: int = 5,
    min_rows: int = 20,
    seed: int = 0,
) -> HygieneReport:
    """Likely label errors among (text, label) rows; `protected` rows (confirmed by several people) never are.

    `reviewers` (who gave each label) weighs the flags by each reviewer's estimated accuracy; `deployed` (the
    ensemble's class probabilities for each text, None where unknown) joins the evidence."""
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
    for i, known in enumerate(deployed or []):
        if known:
            model = np.array([float(known.get(c, 0.0)) for c in classes])
            if model.sum() > 0:
                probs[i] = 0.5 * probs[i] + 0.5 * model / model.sum()
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about small classes; the result is still usable
        flagged = np.asarray(find_label_issues(labels=y, pred_probs=probs, filter_by="prune_by_noise_rate"))
    accuracy: dict[str, float] = {}
    if reviewers is not None:
        posterior, accuracy = reviewer_posteriors(probs[np.arange(n), y], reviewers, len(classes))
        flagged = (posterior < DOUBT) | (flagged & (posterior < SLIP))
    keep = np.ones(n, dtype=bool) if protected is None else ~np.asarray(protected, dtype=bool)
    issues = [
        LabelIssue(i, labels[i], classes[int(probs[i].argmax())], round(float(probs[i, y[i]]), 4))
        for i in map(int, np.flatnonzero(flagged & keep))
    ]
    issues.sort(key=lambda issue: issue.quality)
    return HygieneReport(METHOD, n, k, issues, reviewers=accuracy)
