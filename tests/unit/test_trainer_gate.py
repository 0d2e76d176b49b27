"""The trainer's quality gate: paired bootstrap on macro-F1 and worst-slice F1, class floor, ECE rules."""

from __future__ import annotations

import numpy as np
import pytest
from flockwatch.trainer.gate import GateConfig, HeldOut, Outputs, decide, resample_weights
from sklearn.metrics import f1_score

N = 800
CFG = GateConfig(n_boot=1000)


def _world(seed: int = 0) -> tuple[HeldOut, np.ndarray, np.ndarray]:
    """Two classes (20 % spam), a slice, and per-text difficulty u: a model with confidence c is right iff u < c."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=N) < 0.2).astype(np.int64)
    slices = {"short": rng.uniform(size=N) < 0.3, "long": rng.uniform(size=N) < 0.5}
    return HeldOut(y, ["ham", "spam"], slices), rng.uniform(size=N), rng.uniform(0.55, 1.0, size=N)


def _probs(y: np.ndarray, right: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Binary probabilities: the predicted class (y if right, else the other) gets `conf`."""
    pred = np.where(right, y, 1 - y)
    p = np.empty((len(y), 2))
    p[np.arange(len(y)), pred] = conf
    p[np.arange(len(y)), 1 - pred] = 1 - conf
    return p


def _calibrated(held: HeldOut, u: np.ndarray, conf: np.ndarray) -> np.ndarray:
    return _probs(held.y, u < conf, conf)


def test_bootstrap_row_zero_is_the_observed_macro_f1() -> None:
    held, u, conf = _world()
    result = decide(held, _calibrated(held, u, conf), None, config=CFG)
    pred = np.where(u < conf, held.y, 1 - held.y)
    assert result.challenger["macro_f1"] == pytest.approx(f1_score(held.y, pred, average="macro"))
    assert resample_weights(5, 3, 0)[0].tolist() == [1, 1, 1, 1, 1]


def test_a_real_improvement_passes() -> None:
    held, u, conf = _world()
    better = conf + 0.5 * (1 - conf)  # right on a superset of the champion's texts, and still calibrated
    result = decide(held, _calibrated(held, u, better), _calibrated(held, u, conf), config=CFG)
    assert result.passed, result.reasons
    f1 = next(c for c in result.checks if c.name == "macro_f1").detail
    assert f1["delta"] > 0.05 and f1["p_value"] > 0.5


def test_the_same_model_passes_with_p_one() -> None:
    held, u, conf = _world()
    p = _calibrated(held, u, conf)
    result = decide(held, p, p.copy(), config=CFG)
    assert result.passed
    assert all(c.detail.get("p_value", 1.0) == 1.0 for c in result.checks if c.name != "mcnemar")


def test_a_poisoned_challenger_is_rejected() -> None:
    held, u, conf = _world()
    champion = _calibrated(held, u, conf)
    # poisoned: a third of the ham texts confidently called spam
    right = u < conf
    right[(held.y == 0) & (u < 0.33)] = False
    poisoned = _probs(held.y, right, np.where(right, conf, 0.95))
    result = decide(held, poisoned, champion, config=CFG)
    assert not result.passed
    assert {"macro_f1", "worst_slice_f1", "ece"} <= set(result.reasons)
    assert next(c for c in result.checks if c.name == "macro_f1").detail["p_value"] < 0.01


def test_a_small_insignificant_drop_passes() -> None:
    held, u, conf = _world()
    champion = _calibrated(held, u, conf)
    right = u < conf
    right[np.flatnonzero(right & (held.y == 0))[:3]] = False  # three more mistakes out of 800
    result = decide(held, _probs(held.y, right, conf), champion, config=CFG)
    assert result.checks[1].detail["delta"] < 0
    assert result.passed, result.reasons


def test_a_class_below_the_f1_floor_is_rejected_even_without_a_champion() -> None:
    held, u, conf = _world()
    never_spam = np.tile([0.9, 0.1], (N, 1))
    result = decide(held, never_spam, None, config=CFG)
    assert not result.passed and result.reasons == ["class_f1_floor"]
    assert result.checks[0].detail["below"] == {"spam": 0.0}


def test_winning_only_on_corrected_labels_is_not_enough() -> None:
    """Poisoned corrections also label the held-out texts they fall on: the curated part must not drop."""
    held, u, conf = _world()
    corrected = np.zeros(N, dtype=bool)
    corrected[:200] = True
    held = HeldOut(held.y, held.classes, held.slices, reference=~corrected)
    champion = _calibrated(held, u, conf)
    right = u < conf
    right[:200] = True  # agrees with every (poisoned) corrected label
    right[200:][(held.y[200:] == 0) & (u[200:] < 0.25)] = False  # and errs on curated ham
    result = decide(held, _probs(held.y, right, conf), champion, config=CFG)
    assert "macro_f1_reference" in result.reasons
    assert next(c for c in result.checks if c.name == "macro_f1_reference").detail["n"] == N - 200


def _overconfident(held: HeldOut, u: np.ndarray, conf: float) -> np.ndarray:
    """The same predictions (right iff u < 0.9) at one confidence: ECE ≈ |conf − 0.9|."""
    return _probs(held.y, u < 0.9, np.full(N, conf))


def test_a_calibration_only_run_must_cut_ece_by_five_percent() -> None:
    held, u, _ = _world()
    champion = _overconfident(held, u, 0.99)
    good = decide(held, _overconfident(held, u, 0.95), champion, "recalibrate", CFG)
    assert good.passed, good.reasons
    small = decide(held, _overconfident(held, u, 0.987), champion, "recalibrate", CFG)
    assert small.reasons == ["ece_gain"]
    gain = next(c for c in small.checks if c.name == "ece_gain").detail
    assert gain["challenger"] > gain["required_at_most"]


def test_a_full_retrain_may_not_make_ece_significantly_worse() -> None:
    held, u, _ = _world()
    result = decide(held, _overconfident(held, u, 0.999), _overconfident(held, u, 0.9), "full", CFG)
    assert result.reasons == ["ece"]


def test_the_gate_record_is_json_ready() -> None:
    import json

    held, u, conf = _world()
    record = decide(held, _calibrated(held, u, conf), _calibrated(held, u, conf), config=CFG).to_dict()
    assert json.loads(json.dumps(record))["passed"] is True
    assert {c["name"] for c in record["checks"]} >= {"macro_f1", "worst_slice_f1", "ece", "class_f1_floor", "mcnemar"}


def test_a_challenger_that_stops_answering_is_rejected() -> None:
    """Better probabilities are not enough if its thresholds make the arbiter abstain on everything."""
    held, u, conf = _world()
    better = conf + 0.5 * (1 - conf)
    champion = Outputs(_calibrated(held, u, conf), conf > 0.7)
    silent = Outputs(_calibrated(held, u, better), np.zeros(N, dtype=bool))
    result = decide(held, silent, champion, config=CFG)
    assert result.reasons == ["coverage"]
    detail = next(c for c in result.checks if c.name == "coverage").detail
    assert detail["challenger"] == 0.0 and detail["selective_error"][1] is None
    assert decide(held, Outputs(silent.probs, champion.answered), champion, config=CFG).passed
    fewer = champion.answered & (u < 0.9)  # answers somewhat less, within the margin: passes
    assert decide(held, Outputs(silent.probs, fewer), champion, config=CFG).passed
