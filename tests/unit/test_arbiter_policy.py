"""The arbiter's pure core: stacker, decision paths, conformal sets, risk control, cascade, safety triggers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flockwatch.arbiter.config import CascadeConfig, ConformalConfig, RiskConfig
from flockwatch.arbiter.fit import fit_policy
from flockwatch.arbiter.model import ArbiterPolicy, DecideItem, Escalation
from flockwatch.arbiter.stacker import Stacker
from flockwatch.common.events import Decision, SafetyTrigger, Vote

CLASSES = ["clean", "spam", "toxic"]
HARM = {"clean": 0.5, "spam": 1.0, "toxic": 3.0}
# the one-class-set rule on: these tests cover the sets' part in answering (the default, λ alone: see
# test_selective_guarantee.py)
CONFIG = ConformalConfig(  # with the consensus fast path (opt-in), which these tests exercise
    alpha=0.1,
    mondrian=[],
    risk=RiskConfig(target=0.05, delta=0.1),
    answer_requires_singleton=True,
    consensus_min_prob=0.9,
)


def noisy_probs(y: np.ndarray, sharpness: float, rng: np.random.Generator, k: int = 3) -> np.ndarray:
    """Softmax of a one-hot signal of the given strength plus Gaussian noise."""
    logits = sharpness * np.eye(k)[y] + rng.normal(size=(len(y), k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def synthetic(n: int, seed: int, llm: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two informative voters (one abstaining 30% of the time), a pure-noise voter, optionally a strong 'llm'."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    good, fair = noisy_probs(y, 2.0, rng), noisy_probs(y, 1.0, rng)
    fair[rng.random(n) < 0.3] = np.nan
    votes = {"good": good, "fair": fair, "noise": rng.dirichlet(np.ones(3), size=n)}
    if llm:
        votes["llm"] = noisy_probs(y, 4.0, rng)
    return votes, y


@pytest.fixture(scope="module")
def policy() -> ArbiterPolicy:
    train, y_train = synthetic(1500, seed=1)
    cal, y_cal = synthetic(1500, seed=2)
    return fit_policy(train, y_train, cal, y_cal, CLASSES, HARM, CONFIG, version="test-1")


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


def decisions(policy: ArbiterPolicy, votes: dict[str, np.ndarray]) -> list[Decision]:
    """Decide every row, as the service would (votes built from the arrays; NaN rows: abstained)."""
    n = len(next(iter(votes.values())))
    items = []
    for i in range(n):
        row = [
            vote(v, None if np.isnan(p[i]).any() else dict(zip(CLASSES, p[i].tolist(), strict=True)), text_id=f"t{i}")
            for v, p in votes.items()
        ]
        items.append(DecideItem(f"t{i}", row, f"text {i}", may_escalate=False))
    return [d for d in policy.decide_many(items) if isinstance(d, Decision)]


def test_stacker_learns_to_trust_the_informative_voter_over_noise() -> None:
    votes, y = synthetic(2000, seed=3)
    stacker = Stacker().fit(votes, y, 3)
    test, y_test = synthetic(2000, seed=4)
    accuracy = {}
    for subset in (["good", "fair", "noise"], ["good"], ["fair"], ["noise"]):
        p = stacker.predict_proba({v: test[v] for v in subset})
        accuracy["+".join(subset)] = float((p.argmax(axis=1) == y_test).mean())
    assert accuracy["good+fair+noise"] > accuracy["good"] > accuracy["fair"] > accuracy["noise"]
    assert accuracy["noise"] < 0.45  # noise alone is near chance: the stacker did not invent signal


def test_stacker_outputs_a_prior_when_no_voter_is_present() -> None:
    votes, y = synthetic(500, seed=5)
    stacker = Stacker().fit(votes, y, 3)
    p = stacker.predict_proba({"good": np.full((2, 3), np.nan)})
    assert np.allclose(p.sum(axis=1), 1.0) and np.allclose(p[0], p[1])


def test_stacker_json_roundtrip_is_exact() -> None:
    votes, y = synthetic(500, seed=6)
    stacker = Stacker().fit(votes, y, 3)
    again = Stacker.from_dict(json.loads(json.dumps(stacker.to_dict())))
    assert np.array_equal(stacker.predict_proba(votes), again.predict_proba(votes))


def test_consensus_path_when_voters_agree_confidently(policy: ArbiterPolicy) -> None:
    votes = [vote("good", {"clean": 0.97, "spam": 0.03}), vote("fair", {"clean": 0.93, "spam": 0.07})]
    decision = policy.decide(votes, "t1", latency_ms=5.0)
    assert decision.path == "consensus"
    assert decision.confidence == pytest.approx(0.95)


def test_no_consensus_path_by_default(policy: ArbiterPolicy) -> None:
    assert ConformalConfig().consensus_min_prob is None
    plain = dataclasses.replace(policy, config=policy.config.model_copy(update={"consensus_min_prob": None}))
    votes = [vote("good", {"clean": 0.97, "spam": 0.03}), vote("fair", {"clean": 0.93, "spam": 0.07})]
    decision = plain.decide(votes, "t1")
    assert decision.path == "combiner" and "consensus_min_prob" not in decision.thresholds
    assert decision.confidence != pytest.approx(0.95)  # the combiner's, not the voters' mean


def test_stacker_path_when_one_voter_disagrees(policy: ArbiterPolicy) -> None:
    votes = [vote("good", {"clean": 0.95, "spam": 0.05}), vote("fair", {"spam": 0.95, "clean": 0.05})]
    assert policy.decide(votes, "t1", latency_ms=5.0).path == "combiner"


def test_review_trigger_forces_abstention(policy: ArbiterPolicy) -> None:
    review = SafetyTrigger(rule_id="self-harm", review=True)
    votes = [vote("good", {"clean": 0.99, "spam": 0.01}), vote("regex", None, review)]
    decision = policy.decide(votes, "t1", latency_ms=5.0)
    assert decision.abstain and decision.prediction is None
    assert decision.abstain_reason == "safety review: rule self-harm"
    assert decision.safety_applied == [review]


def test_min_label_floor_raises_the_prediction(policy: ArbiterPolicy) -> None:
    floor = SafetyTrigger(rule_id="slur", min_label="spam")
    votes = [vote("good", {"clean": 0.998, "spam": 0.001, "toxic": 0.001}), vote("regex", None, floor)]
    decision = policy.decide(votes, "t1", latency_ms=5.0)
    assert not decision.abstain, decision.abstain_reason
    assert decision.prediction in ("spam", "toxic")  # the most probable class at least as harmful as "spam"
    assert decision.safety_applied == [floor]


def test_no_votes_abstains_with_path_no_votes(policy: ArbiterPolicy) -> None:
    decision = policy.decide([vote("regex", None)], "t1", latency_ms=5.0)
    assert decision.abstain and decision.path == "no_votes"
    assert decision.abstain_reason is not None and "regex abstained (no match)" in decision.abstain_reason
    assert decision.prediction_set == CLASSES
    assert decision.missing_voters == ["good", "fair", "noise"]


def test_unsure_text_abstains_because_its_set_is_not_a_single_class(policy: ArbiterPolicy) -> None:
    votes = [
        vote("good", {"clean": 0.45, "spam": 0.45, "toxic": 0.1}),
        vote("fair", {"clean": 0.45, "spam": 0.45, "toxic": 0.1}),
    ]
    decision = policy.decide(votes, "t1", 5.0)
    assert decision.abstain and decision.prediction_set == ["clean", "spam"]
    assert decision.abstain_reason == f"prediction set {decision.prediction_set} at 90% is not a single class"


def test_text_no_class_fits_abstains_with_an_empty_set(policy: ArbiterPolicy) -> None:
    decision = policy.decide([vote("fair", {"clean": 0.4, "spam": 0.35, "toxic": 0.25})], "t1", 5.0)
    assert decision.abstain and decision.prediction_set == []
    assert decision.abstain_reason == "empty prediction set at 90%: no class is plausible"


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
    assert decision.thresholds["answer_at"] == policy.answer_at and decision.thresholds["alpha"] == 0.1


def test_any_subset_of_missing_voters_gives_a_decision_or_an_abstention(policy: ArbiterPolicy) -> None:
    votes, _ = synthetic(60, seed=7)
    for subset in (["good"], ["fair"], ["noise"], ["good", "noise"], []):
        decided = decisions(policy, {v: votes[v] for v in subset} or {"good": np.full((60, 3), np.nan)})
        assert len(decided) == 60
        assert all(d.abstain == (d.prediction is None) for d in decided)
        assert all(d.abstain_reason for d in decided if d.abstain)


def test_prediction_sets_cover_held_out_texts_at_one_minus_alpha(policy: ArbiterPolicy) -> None:
    votes, y = synthetic(4000, seed=8)
    decided = decisions(policy, votes)
    covered = np.mean([CLASSES[t] in d.prediction_set for d, t in zip(decided, y, strict=True)])
    # split conformal: E[coverage] ∈ [1 − α, 1 − α + 1/(n_cal + 1)]; 3 binomial standard errors of slack
    tolerance = 3 * np.sqrt(0.1 * 0.9 / len(y))
    assert 0.9 - tolerance <= covered <= 0.9 + 1 / 1501 + tolerance


def test_coverage_guarantee_holds_on_average_over_calibration_draws() -> None:
    from flockwatch.arbiter.conformal import MondrianSets

    train, y_train = synthetic(600, seed=9)
    stacker = Stacker().fit(train, y_train, 3)
    test, y_test = synthetic(3000, seed=10)
    p_test = stacker.predict_proba(test)
    coverages = []
    for seed in range(40):
        cal, y_cal = synthetic(200, seed=100 + seed)
        sets = MondrianSets.fit(stacker.predict_proba(cal), y_cal, [[]] * 200, [], CLASSES, alpha=0.1, by=())
        covered = sets.predict_sets(p_test, [[]] * len(y_test))[np.arange(len(y_test)), y_test]
        coverages.append(covered.mean())
    # E[coverage] ∈ [0.9, 0.9 + 1/201]; the mean of 40 draws of 200 has a standard error of about 0.003
    assert 0.9 - 0.01 <= np.mean(coverages) <= 0.9 + 1 / 201 + 0.01


def test_risk_controlled_threshold_meets_the_error_target_on_held_out_texts(policy: ArbiterPolicy) -> None:
    report = policy.calibration_report["risk"]
    assert report["certified"] and report["risk"] <= 0.05 and report["coverage"] > 0.3
    votes, y = synthetic(4000, seed=11)
    decided = decisions(policy, votes)
    answered = [(d.prediction, CLASSES[t]) for d, t in zip(decided, y, strict=True) if not d.abstain]
    loss = {(a, b): 0.0 if a == b else max(HARM[a], HARM[b]) / 3.0 for a in CLASSES for b in CLASSES}
    assert np.mean([loss[pair] for pair in answered]) <= 0.05
    assert len(answered) / len(y) == pytest.approx(report["coverage"], abs=0.05)


def test_unreachable_target_abstains_on_everything_and_says_so() -> None:
    train, y_train = synthetic(600, seed=12)
    cal, y_cal = synthetic(300, seed=13)
    strict = CONFIG.model_copy(update={"risk": RiskConfig(target=0.001, delta=0.01)})
    policy = fit_policy(train, y_train, cal, y_cal, CLASSES, HARM, strict)
    assert not policy.calibration_report["risk"]["certified"]
    decided = decisions(policy, synthetic(50, seed=14)[0])
    assert all(d.abstain for d in decided)


def test_mondrian_groups_below_the_minimum_fall_back_to_the_pooled_calibrator() -> None:
    from flockwatch.arbiter.conformal import MondrianSets

    rng = np.random.default_rng(15)
    y = rng.integers(0, 3, size=600)
    p = noisy_probs(y, 2.0, rng)
    groups = [["small"] if i < 50 else (["big"] if i < 400 else []) for i in range(600)]
    sets = MondrianSets.fit(p, y, groups, ["small", "big"], CLASSES, alpha=0.01, by=("slice",), min_points=99)
    assert sets.route[("small", "*")] == ("*", "*") and sets.route[("big", "*")] == ("big", "*")
    assert "small|*" in sets.report["fallbacks"] and "big|*" not in sets.report["fallbacks"]
    by_class = MondrianSets.fit(p, y, groups, [], CLASSES, alpha=0.1, by=("class",), min_points=9)
    assert all(by_class.route[("*", c)] == ("*", c) for c in CLASSES)


def test_cascade_escalates_within_budget_and_the_llm_fixes_what_it_is_asked() -> None:
    train, y_train = synthetic(2000, seed=16, llm=True)
    cal, y_cal = synthetic(2000, seed=17, llm=True)
    config = CONFIG.model_copy(update={"cascade": CascadeConfig(voters=["llm"], budget=0.2)})
    policy = fit_policy(train, y_train, cal, y_cal, CLASSES, HARM, config)
    assert policy.cascade_voters == ["llm"] and policy.first_stage_voters == ["good", "fair", "noise"]
    risk = policy.calibration_report["risk"]
    assert risk["certified"] and 0 < risk["call_rate"] <= 0.2
    test, y_test = synthetic(3000, seed=18, llm=True)
    cheap = {v: p for v, p in test.items() if v != "llm"}
    first = decisions_or_escalations(policy, cheap)
    asked = np.array([isinstance(o, Escalation) for o in first])
    assert 0 < asked.mean() <= 0.2
    final = decisions(policy, {**cheap, "llm": np.where(asked[:, None], test["llm"], np.nan)})
    answered = np.array([not d.abstain for d in final])
    wrong = np.array([d.prediction != CLASSES[t] for d, t in zip(final, y_test, strict=True)])
    assert wrong[answered].mean() <= 0.05
    no_cascade = fit_policy(
        train, y_train, cal, y_cal, CLASSES, HARM, CONFIG.model_copy(update={"cascade": CascadeConfig(voters=[])})
    )
    assert answered.mean() > np.mean([not d.abstain for d in decisions(no_cascade, cheap)])


def two_tier_data(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    votes, y = synthetic(n, seed, llm=True)
    votes["mid"] = noisy_probs(y, 2.5, np.random.default_rng(seed + 100))
    return votes, y


@pytest.fixture(scope="module")
def two_tier() -> ArbiterPolicy:
    (train, y_train), (cal, y_cal) = two_tier_data(2000, 30), two_tier_data(2000, 31)
    tiers = [{"voters": ["mid"], "budget": 0.4}, {"voters": ["llm"], "budget": 0.15}]
    config = CONFIG.model_copy(update={"cascade": CascadeConfig.model_validate({"tiers": tiers})})
    return fit_policy(train, y_train, cal, y_cal, CLASSES, HARM, config)


def test_cost_ordered_cascade_runs_rounds_within_each_tiers_budget_and_records_them(two_tier: ArbiterPolicy) -> None:
    policy = two_tier
    test, y_test = two_tier_data(3000, 32)
    assert policy.tiers == [["mid"], ["llm"]] and sorted(policy.sets) == ["cheap", "tier1", "tier2"]
    risk = policy.calibration_report["risk"]
    assert risk["certified"] and risk["reach"][0] <= 0.4 and 0 < risk["reach"][1] <= 0.15
    n = len(y_test)
    rounds = np.zeros(n, dtype=int)
    known = {v: np.full_like(test["good"], np.nan) for v in test}
    for v in ("good", "fair", "noise"):
        known[v] = test[v]
    outcomes: list[Decision | Escalation] = []
    for r in range(3):  # as the service does: decide, ask the next tier for the escalated texts, decide again
        outcomes = decisions_or_escalations(policy, known, rounds)
        asked = [i for i, o in enumerate(outcomes) if isinstance(o, Escalation)]
        assert all(outcomes[i].tier == r + 1 and outcomes[i].voters == policy.tiers[r] for i in asked)
        if not asked:
            break
        voter = policy.tiers[r][0]
        known[voter][asked] = test[voter][asked]
        rounds[asked] = r + 1
    assert 0 < (rounds >= 1).mean() <= 0.4 + 0.03 and 0 < (rounds >= 2).mean() <= 0.15 + 0.03
    final = [o for o in outcomes if isinstance(o, Decision)]
    assert len(final) == n
    answered = np.array([not d.abstain for d in final])
    wrong = np.array([d.prediction != CLASSES[t] for d, t in zip(final, y_test, strict=True)])
    assert wrong[answered].mean() <= 0.05
    for d, r in zip(final, rounds, strict=True):
        assert [x.tier for x in d.rounds] == list(range(r + 1)) and d.escalated == (r > 0)
        assert all("asked" in x.reason for x in d.rounds[:-1]) and "asked" not in d.rounds[-1].reason
    deepest = next(d for d, r in zip(final, rounds, strict=True) if r == 2)
    assert deepest.rounds[1].voters == ["mid"] and deepest.rounds[2].voters == ["llm"]
    assert policy.calibration_report["risk"]["coverage"] > 0.5


def test_each_rounds_record_uses_only_that_rounds_votes(two_tier: ArbiterPolicy) -> None:
    sure = {"clean": 0.96, "spam": 0.02, "toxic": 0.02}
    votes = [vote(v, sure) for v in ("good", "fair", "noise", "mid", "llm")]  # all agree: the consensus path
    d = two_tier.decide_many([DecideItem("t1", votes, "text", rounds=2)])[0]
    assert isinstance(d, Decision) and d.path == "consensus"
    assert [r.voters for r in d.rounds] == [["good", "fair", "noise"], ["mid"], ["llm"]]
    assert all(r.confidence == pytest.approx(0.96) for r in d.rounds)  # a mean of agreeing voters, never a sum


def decisions_or_escalations(
    policy: ArbiterPolicy, votes: dict[str, np.ndarray], rounds: np.ndarray | None = None
) -> list[Decision | Escalation]:
    n = len(next(iter(votes.values())))
    items = [
        DecideItem(
            f"t{i}",
            [
                vote(v, dict(zip(CLASSES, p[i].tolist(), strict=True)), text_id=f"t{i}")
                for v, p in votes.items()
                if not np.isnan(p[i]).any()
            ],
            f"text {i}",
            rounds=0 if rounds is None else int(rounds[i]),
        )
        for i in range(n)
    ]
    return policy.decide_many(items)


def test_serialized_policy_gives_identical_decisions(policy: ArbiterPolicy) -> None:
    again = ArbiterPolicy.from_dict(json.loads(json.dumps(policy.to_dict())), policy.sets, policy.slices)
    votes, _ = synthetic(200, seed=19)

    def key(d: Decision) -> tuple[object, ...]:
        return d.prediction, d.confidence, d.prediction_set, d.abstain_reason, d.path, d.thresholds

    assert [key(d) for d in decisions(policy, votes)] == [key(d) for d in decisions(again, votes)]


def test_lac_sets_without_mapie_checks_are_mapies_sets() -> None:
    """The arbiter computes LAC sets from MAPIE's fitted quantile itself (MAPIE's per-call checks cost more than
    the rest of a small batch's decision): every set equals MAPIE's `predict_set`, at the threshold's edge too;
    a score other than LAC still goes through MAPIE."""
    from flockwatch.arbiter.conformal import MondrianSets

    rng = np.random.default_rng(21)
    y = rng.integers(0, 3, size=900)
    p = noisy_probs(y, 2.0, rng)
    groups = [["a"] if i % 3 == 0 else [] for i in range(900)]
    for method, by in (("lac", ("slice",)), ("lac", ("slice", "class")), ("aps", ())):
        sets = MondrianSets.fit(p, y, groups, ["a"], CLASSES, alpha=0.1, method=method, by=by, min_points=50)
        assert bool(sets._lac_quantiles) == (method == "lac")
        test = np.vstack([noisy_probs(rng.integers(0, 3, size=500), s, rng) for s in (0.5, 2.0, 6.0)])
        for key, clf in sets.calibrators.items():  # probabilities exactly at each class's threshold, and ε off it
            clf.predict_set(test[:1])  # MAPIE computes its quantile in predict_set
            q = float(np.ravel(clf._mapie_classifier.conformity_score_function_.quantiles_)[0])
            edge = np.array(
                [[1 - q, q, 0], [1 - q + 1e-9, q - 1e-9, 0], [1 - q - 5e-9, q + 5e-9, 0], [1 - q - 2e-8, q + 2e-8, 0]]
            )
            probe = np.vstack([test, edge])
            assert np.array_equal(sets._sets(key, probe), np.asarray(clf.predict_set(probe)[1][:, :, 0], dtype=bool))
