"""The arbiter's pure core: the log-linear pool, the decision paths, safety triggers and thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flockwatch.arbiter.combiner import LogLinearPool, choose_abstain_threshold
from flockwatch.arbiter.model import ArbiterPolicy, fit_policy
from flockwatch.common.events import SafetyTrigger, Vote

CLASSES = ["clean", "spam", "toxic"]
HARM = {"clean": 0.5, "spam": 1.0, "toxic": 3.0}


def noisy_probs(y: np.ndarray, sharpness: float, rng: np.random.Generator, k: int = 3) -> np.ndarray:
    """Softmax of a one-hot signal of the given strength plus Gaussian noise."""
    logits = sharpness * np.eye(k)[y] + rng.normal(size=(len(y), k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def synthetic(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two informative voters (one abstaining 30% of the time) and a pure-noise voter."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    good, fair = noisy_probs(y, 2.0, rng), noisy_probs(y, 1.0, rng)
    fair[rng.random(n) < 0.3] = np.nan
    noise = rng.dirichlet(np.ones(3), size=n)
    return {"good": good, "fair": fair, "noise": noise}, y


@pytest.fixture(scope="module")
def policy() -> ArbiterPolicy:
    train, y_train = synthetic(1500, seed=1)
    cal, y_cal = synthetic(1000, seed=2)
    return fit_policy(train, y_train, cal, y_cal, CLASSES, HARM, target_error=0.05, version="test-1")


def vote(voter: str, probs: dict[str, float] | None, *safety: SafetyTrigger, text_id: str = "t1") -> Vote:
    return Vote(
        message_id=Vote.id_for(text_id, voter),
        text_id=text_id,
        voter=voter,
        model_version="v",
        probabilities=probs,
        abstain=probs is None,
        abstain_reason=None if probs is not None else "no match",
        safety=list(safety),
        latency_ms=1.0,
    )


def test_pool_upweights_informative_voter_over_noise_voter() -> None:
    votes, y = synthetic(1500, seed=3)
    pool = LogLinearPool().fit(votes, y)
    weights = dict(zip(pool.voters_, pool.weights_, strict=True))
    assert weights["good"] > weights["fair"] > weights["noise"]
    assert weights["noise"] < 0.2


def test_pool_predicts_with_only_one_voter_present() -> None:
    votes, y = synthetic(1500, seed=4)
    pool = LogLinearPool().fit(votes, y)
    test, y_test = synthetic(500, seed=5)
    probs = pool.predict_proba({"good": test["good"]})
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == y_test).mean() > 0.8


def test_pool_outputs_the_prior_when_no_voter_is_present() -> None:
    votes, y = synthetic(600, seed=6)
    pool = LogLinearPool().fit(votes, y)
    empty = np.full((2, 3), np.nan)
    probs = pool.predict_proba({"good": empty, "fair": empty, "noise": empty})
    assert np.allclose(probs, pool.prior_)


def test_consensus_path_when_voters_agree_confidently(policy: ArbiterPolicy) -> None:
    votes = [vote("good", {"clean": 0.95, "spam": 0.03, "toxic": 0.02}), vote("fair", {"clean": 0.91, "spam": 0.09})]
    decision = policy.decide(votes, "t1", latency_ms=5.0)
    assert decision.path == "consensus"
    assert decision.prediction == "clean"
    assert decision.confidence == pytest.approx(0.93)
    assert decision.probabilities["spam"] == pytest.approx(0.06)


def test_combiner_path_when_one_voter_disagrees(policy: ArbiterPolicy) -> None:
    votes = [vote("good", {"clean": 0.95, "spam": 0.05}), vote("fair", {"clean": 0.2, "spam": 0.8})]
    assert policy.decide(votes, "t1", latency_ms=5.0).path == "combiner"


def test_combiner_path_when_a_voter_agrees_without_confidence(policy: ArbiterPolicy) -> None:
    votes = [vote("good", {"clean": 0.95, "spam": 0.05}), vote("fair", {"clean": 0.6, "spam": 0.4})]
    assert policy.decide(votes, "t1", latency_ms=5.0).path == "combiner"


def test_review_trigger_forces_abstention(policy: ArbiterPolicy) -> None:
    review = SafetyTrigger(rule_id="self-harm", review=True)
    votes = [vote("good", {"clean": 0.99, "spam": 0.01}), vote("regex", None, review)]
    decision = policy.decide(votes, "t1", latency_ms=5.0)
    assert decision.abstain and decision.prediction is None
    assert decision.abstain_reason == "safety review: rule self-harm"
    assert decision.safety_applied == [review]
    assert decision.probabilities and decision.prediction_set == ["clean"]


def test_min_label_floor_raises_the_prediction(policy: ArbiterPolicy) -> None:
    floor = SafetyTrigger(rule_id="slur", min_label="spam")
    votes = [vote("good", {"clean": 0.97, "spam": 0.01, "toxic": 0.02}), vote("regex", None, floor)]
    decision = policy.decide(votes, "t1", latency_ms=5.0)
    assert not decision.abstain
    assert decision.prediction == "toxic"  # the most probable class at least as harmful as "spam"
    assert decision.safety_applied == [floor]


def test_min_label_floor_already_met_changes_nothing(policy: ArbiterPolicy) -> None:
    floor = SafetyTrigger(rule_id="ad", min_label="spam")
    votes = [vote("good", {"clean": 0.01, "spam": 0.98, "toxic": 0.01}), vote("regex", None, floor)]
    decision = policy.decide(votes, "t1", latency_ms=5.0)
    assert decision.prediction == "spam" and decision.safety_applied == []


def test_no_votes_abstains_with_path_no_votes(policy: ArbiterPolicy) -> None:
    decision = policy.decide([vote("regex", None)], "t1", latency_ms=5.0)
    assert decision.abstain and decision.path == "no_votes"
    assert decision.abstain_reason is not None
    assert decision.abstain_reason.startswith("no voter gave an opinion")
    assert "regex abstained (no match)" in decision.abstain_reason
    assert decision.prediction_set == CLASSES
    assert decision.missing_voters == ["good", "fair", "noise"]


def test_low_confidence_abstains_with_its_reason(policy: ArbiterPolicy) -> None:
    decision = policy.decide([vote("fair", {"clean": 0.4, "spam": 0.35, "toxic": 0.25})], "t1", 5.0)
    assert decision.abstain and decision.prediction is None
    assert decision.abstain_reason == f"confidence {decision.confidence:.2f} < threshold {policy.abstain_below:.2f}"


def test_vote_with_unknown_class_is_treated_as_abstaining(policy: ArbiterPolicy) -> None:
    decision = policy.decide([vote("good", {"clean": 0.5, "phishing": 0.5})], "t1", latency_ms=5.0)
    assert decision.path == "no_votes"
    assert decision.abstain_reason is not None and "good ignored" in decision.abstain_reason


def test_decision_records_votes_missing_voters_and_thresholds(policy: ArbiterPolicy) -> None:
    votes = [vote("good", {"clean": 0.9, "spam": 0.1}), vote("good", {"spam": 1.0}), vote("fair", None, text_id="t2")]
    decision = policy.decide(votes, "t1", latency_ms=5.0)
    assert decision.message_id == "decision:t1" and decision.arbiter_version == "test-1"
    assert decision.votes == votes[:1]
    assert decision.missing_voters == ["fair", "noise"]
    assert decision.thresholds == {"consensus_min_prob": 0.9, "abstain_below": policy.abstain_below, "set_level": 0.9}


def test_prediction_set_is_the_smallest_top_set_reaching_the_level(policy: ArbiterPolicy) -> None:
    votes = [vote("good", {"clean": 0.5, "spam": 0.3, "toxic": 0.2}), vote("fair", {"clean": 0.6, "spam": 0.4})]
    decision = policy.decide(votes, "t1", latency_ms=5.0)
    ranked = sorted(decision.probabilities, key=decision.probabilities.__getitem__, reverse=True)
    mass = np.cumsum([decision.probabilities[c] for c in ranked])
    size = len(decision.prediction_set)
    assert decision.prediction_set == ranked[:size]
    assert mass[size - 1] >= 0.9 and (size == 1 or mass[size - 2] < 0.9)


def test_threshold_chooser_meets_the_target_on_synthetic_data() -> None:
    rng = np.random.default_rng(7)
    confidence = rng.uniform(0.3, 1.0, size=5000)
    correct = rng.random(5000) < confidence  # calibrated: P(correct) = confidence
    choice = choose_abstain_threshold(confidence, correct, target_error=0.05)
    assert choice.met and choice.error <= 0.05
    assert 0.8 < choice.threshold < 0.95
    assert choice.coverage == pytest.approx((confidence >= choice.threshold).mean())


def test_threshold_chooser_reports_an_unmet_target() -> None:
    choice = choose_abstain_threshold(np.array([0.9, 0.8, 0.7]), np.array([False, True, True]), target_error=0.1)
    assert not choice.met
    assert choice.threshold == 0.7 and choice.error == pytest.approx(1 / 3)


def test_fit_policy_records_what_calibration_achieved(policy: ArbiterPolicy) -> None:
    report = policy.calibration_report
    assert report["met"] and report["error"] <= 0.05
    assert report["threshold"] == policy.abstain_below
    assert 0.5 < report["coverage"] < 1.0


def test_decide_makes_the_decisions_that_calibration_scored(policy: ArbiterPolicy) -> None:
    cal, _ = synthetic(200, seed=9)
    cal["good"][:100] = np.where(np.arange(3) == 0, 0.95, 0.025)  # consensus rows where "fair" agrees
    cal["fair"][:50] = np.where(np.arange(3) == 0, 0.92, 0.04)
    cal["noise"][:50] = np.nan
    cal["noise"][150:] = np.nan
    cal["fair"][150:] = np.nan
    cal["good"][175:] = np.nan
    batch = policy.combine_arrays(cal)
    for i in range(200):
        votes = [vote(v, dict(zip(CLASSES, p[i], strict=True))) for v, p in cal.items() if not np.isnan(p[i]).any()]
        decision = policy.decide(votes, "t1", latency_ms=1.0)
        assert decision.path == ("no_votes", "consensus", "combiner")[batch.path[i]]
        if decision.path == "no_votes":
            assert decision.abstain
            continue
        assert decision.confidence == pytest.approx(batch.probabilities[i].max(), abs=1e-12)
        assert decision.abstain == (batch.probabilities[i].max() < policy.abstain_below)
    assert (batch.path[:50] == 1).all() and (batch.path[175:] == 0).all()


def test_json_roundtrip_gives_identical_decisions(policy: ArbiterPolicy) -> None:
    restored = ArbiterPolicy.from_dict(json.loads(json.dumps(policy.to_dict(), allow_nan=False)))
    rng = np.random.default_rng(8)
    for i in range(50):
        p, q = rng.dirichlet(np.ones(3)), rng.dirichlet(np.full(3, 0.3))
        votes = [vote("good", dict(zip(CLASSES, p, strict=True))), vote("fair", dict(zip(CLASSES, q, strict=True)))]
        a = policy.decide(votes, f"t{i}", latency_ms=1.0).model_dump(exclude={"timestamp"})
        b = restored.decide(votes, f"t{i}", latency_ms=1.0).model_dump(exclude={"timestamp"})
        assert a == b
