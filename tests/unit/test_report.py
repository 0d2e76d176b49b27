import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flockwatch.common.metrics import coverage_at_risk, maximum_calibration_error, risk_coverage_curve
from flockwatch.trainer.report import REPORT_STEPS, EvalInputs, compute_metrics, write_report

NAN3 = [np.nan] * 3
PNGS = ["f1.png", "slices.png", "reliability.png", "risk_coverage.png", "confusion.png", "voter_usage.png"]

# Six texts, three classes. The ensemble is right on rows 0-2 and 4, wrong on row 3 (says a, truth b), and has
# no votes on row 5; the arbiter answered rows 0, 2, 3, 4. Confidences .9 .6 .7 .5 .8 sit in separate ECE bins.
ENSEMBLE = [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], NAN3]


def _inputs(**overrides: Any) -> EvalInputs:
    values: dict[str, Any] = {
        "classes": ["a", "b", "c"],
        "y_true": ["a", "a", "b", "b", "c", "c"],
        "voters": {
            "v1": np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], NAN3, [0.3, 0.6, 0.1], [0.1, 0.1, 0.8], NAN3]),
            "silent": np.full((6, 3), np.nan),
        },
        "ensemble": np.array(ENSEMBLE),
        "answered": np.array([True, False, True, True, True, False]),
        "prediction_sets": [["a"], ["a", "b"], ["b"], ["a", "b"], ["c"], []],
        "paths": ["consensus", "combiner", "combiner", "combiner", "consensus", "no_votes"],
        "voters_used": [["v1"], ["v1"], [], ["v1"], ["v1", "llm"], []],
        "llm_called": np.array([False, True, False, True, False, False]),
        "slices": {"short": [0, 1], "hard": [2, 3, 5], "empty": []},
        "baselines": {"mean_of_voters": np.array(ENSEMBLE)},
        "abstain_reasons": [None, "low_confidence", None, None, None, "no_votes"],
    }
    return EvalInputs(**(values | overrides))


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    return compute_metrics(_inputs())


def test_ensemble_f1_on_answered_and_on_all_texts_with_votes(metrics: dict[str, Any]) -> None:
    e = metrics["ensemble"]
    # answered rows 0,2,3,4: F1 a = 2/3, b = 2/3, c = 1
    assert e["per_class_f1"] == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 1.0})
    assert e["macro_f1"] == pytest.approx(7 / 9)
    # rows 0-4 forced: F1 a = 0.8, b = 2/3, c = 1
    assert e["macro_f1_all"] == pytest.approx((0.8 + 2 / 3 + 1) / 3)
    assert e["coverage"] == pytest.approx(4 / 6)
    assert e["selective_error"] == pytest.approx(1 / 4)
    assert e["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_calibration_uses_rows_with_opinions_only(metrics: dict[str, Any]) -> None:
    e, v1 = metrics["ensemble"], metrics["voters"]["v1"]
    # one row per bin, gaps .1 .4 .3 .5 .2
    assert e["ece"] == pytest.approx(0.3)
    assert e["mce"] == pytest.approx(0.5)
    brier = [0.015, 0.26, 0.14, 0.62, 0.06]  # sum of squared one-hot gaps per row
    assert e["brier"] == pytest.approx(np.mean(brier))
    # v1 is right on its four rows with confidences .8 .7 .6 .8
    assert v1["ece"] == pytest.approx(0.5 * 0.2 + 0.25 * 0.3 + 0.25 * 0.4)
    assert v1["mce"] == pytest.approx(0.4)
    assert v1["coverage"] == pytest.approx(4 / 6)
    assert v1["macro_f1"] == 1.0


def test_coverage_at_risk_target_reads_the_confidence_ordered_curve() -> None:
    # ranked by confidence: .9 .8 .7 .6 right, then .5 wrong
    assert compute_metrics(_inputs(risk_target=0.01))["ensemble"]["coverage_at_risk_target"] == pytest.approx(4 / 6)
    assert compute_metrics(_inputs(risk_target=0.2))["ensemble"]["coverage_at_risk_target"] == pytest.approx(5 / 6)


def test_risk_coverage_curve_answers_tied_confidences_together() -> None:
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.7, 0.3], [np.nan, np.nan]])
    coverage, risk, thresholds = risk_coverage_curve(probs, [0, 0, 1, 0])
    assert coverage.tolist() == [0.25, 0.75]
    assert risk == pytest.approx([0.0, 1 / 3])
    assert thresholds.tolist() == [0.9, 0.7]
    assert coverage_at_risk(probs, [0, 0, 1, 0], 0.3) == 0.25
    assert coverage_at_risk(probs, [1, 0, 1, 0], 0.3) == 0.0


def test_mce_is_the_worst_bin_gap() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    assert maximum_calibration_error(probs, [0, 1, 1, 1], n_bins=5) == pytest.approx(0.4)
    assert np.isnan(maximum_calibration_error(np.full((2, 2), np.nan), [0, 1]))


def test_prediction_set_metrics(metrics: dict[str, Any]) -> None:
    e = metrics["ensemble"]
    assert e["set_coverage"] == pytest.approx(5 / 6)
    assert e["set_size_mean"] == pytest.approx(7 / 6)
    assert e["singleton_rate"] == pytest.approx(3 / 6)
    assert e["empty_set_rate"] == pytest.approx(1 / 6)


def test_paths_voter_usage_and_llm_rate(metrics: dict[str, Any]) -> None:
    e = metrics["ensemble"]
    assert e["paths"] == {"consensus": 2, "combiner": 3, "no_votes": 1}
    assert e["voter_usage"] == pytest.approx({"v1": 4 / 6, "silent": 0.0, "llm": 1 / 6})
    assert e["llm_call_rate"] == pytest.approx(1 / 3)
    assert e["abstain_reasons"] == {"low_confidence": 1, "no_votes": 1}


def test_slices_and_the_worst_one(metrics: dict[str, Any]) -> None:
    s = metrics["slices"]
    assert s["short"] == pytest.approx(
        {"n": 2, "macro_f1": 1.0, "macro_f1_all": 1.0, "coverage": 0.5, "selective_error": 0.0}
    )
    # answered b→b and b→a: F1 a = 0, b = 2/3
    assert s["hard"]["macro_f1"] == pytest.approx(1 / 3)
    assert s["hard"]["coverage"] == pytest.approx(2 / 3)
    assert s["empty"] == {"n": 0, "macro_f1": None, "macro_f1_all": None, "coverage": 0.0, "selective_error": None}
    assert metrics["ensemble"]["worst_slice"] == "hard"
    assert metrics["ensemble"]["worst_slice_f1"] == pytest.approx(1 / 3)


def test_voter_that_always_abstains_gets_nulls(metrics: dict[str, Any]) -> None:
    silent = metrics["voters"]["silent"]
    assert silent["coverage"] == 0.0
    assert silent["macro_f1"] is silent["ece"] is silent["mce"] is silent["brier"] is silent["selective_error"] is None


def test_required_keys_and_strict_json(metrics: dict[str, Any]) -> None:
    required = ["macro_f1", "macro_f1_all", "per_class_f1", "ece", "mce", "brier", "coverage", "selective_error"]
    required += ["coverage_at_risk_target", "set_coverage", "set_size_mean", "singleton_rate", "worst_slice_f1"]
    required += ["worst_slice", "llm_call_rate", "paths", "voter_usage", "confusion_matrix"]
    assert set(required) <= metrics["ensemble"].keys()
    for entry in [*metrics["voters"].values(), *metrics["baselines"].values()]:
        assert {"macro_f1", "per_class_f1", "ece", "mce", "brier", "coverage"} <= entry.keys()
    assert {"n", "classes", "risk_target", "slices"} <= metrics.keys()
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


def test_write_report_writes_metrics_plots_and_markdown(tmp_path: Path) -> None:
    steps: list[str] = []
    returned = write_report(_inputs(), tmp_path / "out", progress=steps.append, title="Test run")
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text()) == returned
    report = (out / "report.md").read_text()
    assert report.startswith("# Test run")
    for png in PNGS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert tuple(steps) == REPORT_STEPS


def test_report_when_nothing_has_votes(tmp_path: Path) -> None:
    nan = np.full((2, 3), np.nan)
    inputs = _inputs(
        y_true=["a", "b"],
        voters={"v1": nan},
        ensemble=nan,
        answered=np.zeros(2, dtype=bool),
        prediction_sets=[[], []],
        paths=["no_votes"] * 2,
        voters_used=[[], []],
        llm_called=np.zeros(2, dtype=bool),
        slices={},
        baselines={},
        abstain_reasons=[],
    )
    m = write_report(inputs, tmp_path)
    assert m["ensemble"]["coverage"] == 0.0
    assert m["ensemble"]["macro_f1"] is m["ensemble"]["selective_error"] is m["ensemble"]["worst_slice_f1"] is None
    assert m["ensemble"]["confusion_matrix"] == [[0] * 3] * 3
    assert all((tmp_path / png).stat().st_size > 0 for png in PNGS)


def test_inputs_reject_unknown_labels_and_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="not among the classes"):
        _inputs(prediction_sets=[["z"]] * 6)
    with pytest.raises(ValueError, match="v1: probabilities must have shape"):
        _inputs(voters={"v1": np.zeros((5, 3))})
    with pytest.raises(ValueError, match="paths has 1 entries"):
        _inputs(paths=["consensus"])
