import json

import numpy as np
import pytest
from flockwatch.common.metrics import (
    brier_score,
    classification_report,
    expected_calibration_error,
    risk_coverage,
)

CLASSES = ["a", "b"]


def test_ece_near_zero_when_confidence_matches_accuracy() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 200_000)
    correct = rng.uniform(size=confidence.size) < confidence
    probs = np.column_stack([confidence, 1 - confidence])
    y = np.where(correct, 0, 1)
    assert expected_calibration_error(probs, y) < 0.01


def test_ece_matches_hand_computed_bins() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    # bins of width 0.2: {0.9} acc 1 → 0.1; {0.8, 0.7} acc 0.5 → 0.25; {0.6} acc 1 → 0.4
    assert expected_calibration_error(probs, [0, 1, 1, 1], n_bins=5) == pytest.approx(
        0.25 * 0.1 + 0.5 * 0.25 + 0.25 * 0.4
    )


def test_ece_of_certain_coin_flips_is_one_half() -> None:
    probs = np.array([[1.0, 0.0]] * 4)
    assert expected_calibration_error(probs, [0, 1, 0, 1]) == pytest.approx(0.5)


def test_ece_skips_abstained_rows() -> None:
    probs = np.array([[1.0, 0.0], [np.nan, np.nan]])
    assert expected_calibration_error(probs, [0, 1]) == 0.0


def test_brier_matches_hand_computed_value() -> None:
    probs = np.array([[0.8, 0.2], [0.5, 0.5]])
    assert brier_score(probs, [0, 1]) == pytest.approx((0.04 + 0.04 + 0.25 + 0.25) / 2)


def test_report_excludes_abstained_rows() -> None:
    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8], [np.nan, np.nan]])
    report = classification_report(["a", "a", "b", "b"], probs, CLASSES)
    assert report["n"] == 4
    assert report["n_answered"] == 2
    assert report["coverage"] == 0.5
    assert report["accuracy"] == 1.0
    assert report["macro_f1"] == 1.0
    assert report["selective_error"] == 0.0


def test_report_accepts_none_rows_like_nan_rows() -> None:
    rows = [[0.9, 0.1], None, [0.2, 0.8]]
    nan_rows = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8]])
    y = ["a", "b", "b"]
    assert classification_report(y, rows, CLASSES) == classification_report(y, nan_rows, CLASSES)


def test_answered_mask_narrows_selective_metrics_only() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    report = classification_report(["a", "b", "b"], probs, CLASSES, answered=[True, False, True])
    assert report["n_scored"] == 3
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["n_answered"] == 2
    assert report["coverage"] == pytest.approx(2 / 3)
    assert report["selective_error"] == 0.0
    assert report["macro_f1_answered"] == 1.0


def test_report_is_strict_json() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    report = classification_report(["a", "b"], probs, ["a", "b", "c"])
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["per_class_f1"]["c"] is None


def test_report_when_voter_abstains_on_everything() -> None:
    report = classification_report(["a", "b"], None, CLASSES)
    assert report["n_answered"] == 0
    assert report["coverage"] == 0.0
    assert report["macro_f1"] is None
    assert report["ece"] is None


def test_report_rejects_unknown_labels() -> None:
    with pytest.raises(ValueError, match="not among the classes"):
        classification_report(["a", "z"], np.array([[0.5, 0.5]] * 2), CLASSES)


def test_risk_coverage_trades_coverage_for_error() -> None:
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.55, 0.45], [np.nan, np.nan]])
    rows = risk_coverage(probs, [0, 1, 0, 0], thresholds=[0.0, 0.58, 0.9, 0.99])
    assert [r["coverage"] for r in rows] == [0.75, 0.5, 0.25, 0.0]
    assert rows[0]["selective_error"] == pytest.approx(1 / 3)
    assert rows[1]["selective_error"] == pytest.approx(1 / 2)
    assert rows[2]["selective_error"] == 0.0
    assert rows[3]["selective_error"] is None
