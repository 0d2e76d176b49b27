"""Metrics of a bundle trained without a test set: its voters' and its ensemble's out-of-fold outputs.

Every number here comes from models that did not train on the text scored (the voters' K-fold outputs,
the combiner cross-fitted over the same folds), so they estimate quality on new texts; the answered
share and error are the calibration's own (what learn-then-test certified on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flockwatch.arbiter.model import ArbiterPolicy
from flockwatch.common.metrics import classification_report


def out_of_fold_metrics(
    oof: Mapping[str, np.ndarray], policy: ArbiterPolicy, y: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """`metrics.json` for a bundle without a test set: per voter and for the ensemble, out of fold."""
    truth = [classes[i] for i in y]
    voters = {v: classification_report(truth, p, classes) for v, p in oof.items() if len(p) == len(y)}
    ensemble: dict[str, Any] = {}
    if policy.calibration_scores is not None:
        probs, answered, y_cal = policy.calibration_scores
        report = classification_report([classes[i] for i in y_cal], probs, classes, answered)
        # `macro_f1` of a test report is on answered texts, `macro_f1_all` forced on every text: same keys here
        ensemble = {**report, "macro_f1_all": report["macro_f1"], "macro_f1": report["macro_f1_answered"]}
    return {"source": "out-of-fold (no test set)", "n": len(y), "voters": voters, "ensemble": ensemble}
