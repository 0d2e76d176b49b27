"""Tight risk control, the combiner choice and cross-fitted calibration (issue 18), on synthetic voters."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flockwatch.arbiter.config import CascadeConfig, ConformalConfig, RiskConfig
from flockwatch.arbiter.fit import fit_policy
from flockwatch.arbiter.model import Escalation
from flockwatch.arbiter.risk import Stage, _allowed_errors, _Chain, _lambda_chain, choose_thresholds, risk_p_values
from flockwatch.arbiter.select import fold_ids, macro_f1, one_standard_error, oof_temperature, select_combiner
from flockwatch.arbiter.stacker import Stacker
from flockwatch.common.datasets import Dataset, hold_out
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
from scipy.special import softmax
from scipy.stats import binom
from sklearn.metrics import f1_score

from tests.unit.test_arbiter_policy import CLASSES, HARM, decisions, decisions_or_escalations, noisy_probs, synthetic

THREE_PERCENT = ConformalConfig(
    alpha=0.1,
    mondrian=[],
    risk=RiskConfig(target=0.03, delta=0.1, harm_weighted=False),
    cascade=CascadeConfig(tiers=[]),
)


def test_binary_loss_uses_the_exact_binomial_tail() -> None:
    p = risk_p_values(np.array([2 / 592]), np.array([592.0]), 0.01, binary=True)[0]
    assert p == pytest.approx(binom.cdf(2, 592, 0.01))
    hb = compute_hoeffding_bentkus_p_value(np.array([2 / 592]), np.array([592.0]), 0.01, True)[0, 0]
    assert p >= hb  # MAPIE's binary HB is the smaller of this tail and Hoeffding's: not itself a valid p-value
    # the case SMS hit: 2 errors in 592 answers, p = 0.065: refused at δ/4 (four starts), certified at δ = 0.1


def test_two_errors_in_592_answers_certify_one_percent() -> None:
    n, errors = 592, 2
    conf = np.linspace(1.0, 0.9, n)
    pred = np.zeros(n, dtype=np.int64)
    y = pred.copy()
    y[[580, 590]] = 1  # the two mistakes are the least confident answers
    stage = Stage(conf, pred, np.ones(n, dtype=bool))
    loss = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert errors == int((y != pred).sum())
    one = choose_thresholds([stage], y, loss, 0.01, 0.1, grid=5, starts=1)
    assert one.certified and one.coverage == 1.0 and one.p_value == pytest.approx(binom.cdf(2, n, 0.01))


def test_harm_weighted_loss_keeps_hoeffding_bentkus() -> None:
    p = risk_p_values(np.array([0.004]), np.array([800.0]), 0.01, binary=False)[0]
    assert p == pytest.approx(
        compute_hoeffding_bentkus_p_value(np.array([0.004]), np.array([800.0]), 0.01, False)[0, 0]
    )


def test_one_confident_mistake_early_does_not_end_a_single_start_chain() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    conf = np.sort(1.0 - rng.beta(1.0, 150.0, n))[::-1]
    y = np.zeros(n, dtype=np.int64)
    pred = np.where(rng.random(n) < 1 - conf, 1, 0)  # calibrated: a text is wrong with probability 1 − confidence
    pred[5] = 1  # the most confident texts include one mistake
    stage = Stage(conf, pred, np.ones(n, dtype=bool))
    choice = choose_thresholds([stage], y, np.array([[0.0, 1.0], [1.0, 0.0]]), 0.01, 0.1)
    assert choice.certified and choice.coverage > 0.5
    assert {p["target"] for p in choice.frontier} >= {0.005, 0.01, 0.05}
    coverages = [p["coverage"] for p in choice.frontier]
    assert coverages == sorted(coverages)  # a looser target never certifies less


def test_the_combiner_never_loses_to_its_best_voter_out_of_fold() -> None:
    rng = np.random.default_rng(1)
    n = 1500
    y = rng.choice(3, size=n, p=[0.8, 0.15, 0.05])  # imbalanced, where a plain stacker can lose macro-F1
    votes = {"strong": noisy_probs(y, 3.0, rng), "weak": noisy_probs(y, 0.5, rng), "noise": rng.dirichlet([1, 1, 1], n)}
    folds = fold_ids(y, 5)
    chosen = select_combiner(votes, y, 3, folds, Stacker())
    best_voter = f1_score(y, votes["strong"].argmax(axis=1), average="macro")
    best = max(s["macro_f1"] for s in chosen.scores.values())
    assert chosen.scores[chosen.name]["macro_f1"] >= best - chosen.scores[chosen.name]["se"]  # one-SE rule
    assert chosen.scores[chosen.name]["macro_f1"] >= chosen.scores["voter:strong"]["macro_f1"]
    assert chosen.scores["voter:strong"]["macro_f1"] == pytest.approx(best_voter, abs=0.02)  # temperature keeps argmax
    assert len(chosen.fold_stackers) == 5


def test_the_simplest_candidate_within_one_standard_error_wins() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 2000)
    right = np.where(rng.random(2000) < 0.9, y, (y + 1) % 3)  # 90 % right
    nearly = right.copy()  # 22 rows worse, 18 better: a gap of 4 rows where they disagree on 40
    worse, better = np.flatnonzero(right == y)[:22], np.flatnonzero(right != y)[:18]
    nearly[worse], nearly[better] = (y[worse] + 1) % 3, y[better]
    much = np.where(rng.random(2000) < 0.75, y, (y + 2) % 3)
    scores: dict[str, dict[str, float]] = {n: {} for n in ("voter:a", "pool", "stacker")}
    preds = {"voter:a": much, "pool": nearly, "stacker": right}
    assert one_standard_error(y, preds, scores, 3) == "pool"
    assert scores["pool"]["se"] > 0 and scores["stacker"]["se"] == 0.0
    assert one_standard_error(y, {"voter:a": much, "stacker": right}, {"voter:a": {}, "stacker": {}}, 3) == "stacker"
    # a voter within one standard error is simpler than the pool
    pool = nearly.copy()
    pool[np.flatnonzero(nearly == y)[:3]] = (y[np.flatnonzero(nearly == y)[:3]] + 1) % 3  # within SE too
    assert one_standard_error(y, {"voter:a": nearly, "pool": pool, "stacker": right}, scores, 3) == "voter:a"
    assert macro_f1(y, np.full(2000, -1), 3) == 0.0  # rows without an answer are misses


def test_an_overconfident_combiner_gets_its_temperature_back() -> None:
    votes, y = synthetic(2000, seed=7)
    calibrated = Stacker(kind="pool").fit(votes, y, 3).predict_proba(votes)
    overconfident = softmax(np.log(calibrated) * 2.5, axis=1)  # the same answers, far surer
    t = oof_temperature(overconfident, y)
    assert t == pytest.approx(2.5, rel=0.1)  # dividing the log-probabilities by it undoes the × 2.5
    again = softmax(np.log(overconfident) / t, axis=1)
    assert np.abs(again - calibrated).max() < 0.05


def test_the_temperature_places_the_start_but_leaves_the_served_confidences() -> None:
    votes, y = synthetic(900, seed=8)
    folds = fold_ids(y, 3)
    chosen = select_combiner(votes, y, 3, folds, Stacker())
    assert chosen.report()["temperature"] == pytest.approx(chosen.temperature, abs=1e-4)
    raw = Stacker(**chosen.stacker.get_params()).fit(votes, y, 3).predict_proba(votes)
    np.testing.assert_allclose(chosen.stacker.predict_proba(votes), raw)  # served as fitted
    sets = np.ones_like(raw, dtype=bool)
    plain = Stage.from_sets(raw, sets, require_singleton=False)
    softened = Stage.from_sets(raw, sets, require_singleton=False, temperature=2.0)
    np.testing.assert_array_equal(plain.confidence, softened.confidence)  # the thresholds' scale is unchanged
    assert plain.expected is None and (softened.chance < plain.confidence + 1e-12).all()
    # a surer-than-right combiner: with its estimated chances the chain starts at fewer texts
    start = 1
    late = _lambda_chain(plain, start, 200, target=0.05)
    early = _lambda_chain(softened, start, 200, target=0.05)
    assert early[0] > late[0]


def test_pool_and_single_voter_combiners_round_trip_as_plain_stackers() -> None:
    votes, y = synthetic(600, seed=4)
    for stacker in (Stacker(kind="pool"), Stacker(kind="pool", only="good")):
        fitted = stacker.fit(votes, y, 3)
        again = Stacker.from_dict(fitted.to_dict())
        np.testing.assert_allclose(again.predict_proba(votes), fitted.predict_proba(votes))
    alone = Stacker(kind="pool", only="good").fit(votes, y, 3).predict_proba(votes)
    assert (alone.argmax(axis=1) == votes["good"].argmax(axis=1)).mean() > 0.95  # intercepts may shift a near tie


def test_the_blend_is_the_mean_of_the_pool_and_the_stacker_in_logits_and_round_trips() -> None:
    votes, y = synthetic(600, seed=5)
    blend = Stacker(kind="blend").fit(votes, y, 3)
    pool, stacker = Stacker(kind="pool").fit(votes, y, 3), Stacker(kind="logistic").fit(votes, y, 3)
    mean = (np.log(pool.predict_proba(votes)) + np.log(stacker.predict_proba(votes))) / 2
    np.testing.assert_allclose(blend.predict_proba(votes), softmax(mean, axis=1), atol=1e-9)
    again = Stacker.from_dict(blend.to_dict())
    np.testing.assert_allclose(again.predict_proba(votes), blend.predict_proba(votes))
    with pytest.raises(ValueError, match="only"):
        Stacker(kind="blend", only="good").fit(votes, y, 3)


def test_the_blend_is_the_default_within_one_standard_error() -> None:
    """The blend comes first in the rule's order: chosen unless another candidate's out-of-fold macro-F1 is more
    than one standard error ahead, or it is below the best voter's (then the best candidate wins)."""
    votes, y = synthetic(1500, seed=6)
    chosen = select_combiner(votes, y, 3, fold_ids(y, 5), Stacker())
    assert list(chosen.scores)[0] == "blend"
    best = max(s["macro_f1"] for s in chosen.scores.values())
    blend = chosen.scores["blend"]
    floor = max(s["macro_f1"] for n, s in chosen.scores.items() if n.startswith("voter:"))
    assert (chosen.name == "blend") == (blend["macro_f1"] >= best - blend["se"] and blend["macro_f1"] >= floor)


def test_crossfitted_calibration_holds_the_target_on_new_texts_in_most_draws() -> None:
    """The guarantee of cross-fitted calibration is approximate: checked over draws (the real sets: quality.py)."""
    exceed, coverage = [], []
    for seed in range(10):
        votes, y = synthetic(1000, seed=100 + seed)
        policy = fit_policy(votes, y, None, None, CLASSES, HARM, THREE_PERCENT, folds=fold_ids(y, 5), choose=False)
        assert policy.calibration_report["scheme"] == "cross-fitted"
        test, y_test = synthetic(3000, seed=500 + seed)
        decided = decisions(policy, test)
        answered = np.array([not d.abstain for d in decided])
        wrong = np.array([d.prediction != CLASSES[t] for d, t in zip(decided, y_test, strict=True)])
        coverage.append(answered.mean())
        if answered.any():
            exceed.append(wrong[answered].mean() > 0.03)
    assert np.mean(coverage) > 0.4  # it answers a real share under a 3 % target
    assert np.mean(exceed) <= 0.2  # ≤ δ = 0.1 of the draws exceed the target (one draw of slack in 10)


def test_crossfitted_calibration_needs_the_folds() -> None:
    votes, y = synthetic(300, seed=5)
    with pytest.raises(ValueError, match="folds"):
        fit_policy(votes, y, None, None, CLASSES, HARM, THREE_PERCENT)


def test_held_out_share_is_stable_and_keeps_copies_together() -> None:
    texts = [f"text number {i}" for i in range(4000)] + ["Text  Number 7"]
    data = Dataset(texts, ["a"] * len(texts))
    kept, held = hold_out(data, 0.25, "test")
    assert 0.22 < len(held) / len(data) < 0.28 and len(kept) + len(held) == len(data)
    assert hold_out(data, 0.25, "test") == (kept, held)
    assert ("text number 7" in held.texts) == ("Text  Number 7" in held.texts)
    assert hold_out(data, 0.0, "test")[1].texts == []


def test_cascade_escalates_what_the_cheap_voters_cannot_answer_within_budget() -> None:
    train, y_train = synthetic(2000, seed=16, llm=True)
    config = THREE_PERCENT.model_copy(update={"cascade": CascadeConfig(voters=["llm"], budget=0.2)})
    policy = fit_policy(train, y_train, None, None, CLASSES, HARM, config, folds=fold_ids(y_train, 5), choose=False)
    risk = policy.calibration_report["risk"]
    assert risk["certified"] and 0 < risk["call_rate"] <= 0.2
    assert 0.5 < policy.escalate_below <= 1.0  # λ̂: below it a text goes up the cascade even with a one-class set
    test, y_test = synthetic(3000, seed=18, llm=True)
    cheap = {v: p for v, p in test.items() if v != "llm"}
    first = decisions_or_escalations(policy, cheap)
    asked = np.array([isinstance(o, Escalation) for o in first])
    assert 0 < asked.mean() <= 0.2 + 0.03
    final = decisions(policy, {**cheap, "llm": np.where(asked[:, None], test["llm"], np.nan)})
    answered = np.array([not d.abstain for d in final])
    wrong = np.array([d.prediction != CLASSES[t] for d, t in zip(final, y_test, strict=True)])
    assert wrong[answered].mean() <= 0.03
    without = THREE_PERCENT.model_copy(update={"cascade": CascadeConfig(tiers=[])})
    cheap_train = {v: p for v, p in train.items() if v != "llm"}
    folds = fold_ids(y_train, 5)
    alone = fit_policy(cheap_train, y_train, None, None, CLASSES, HARM, without, folds=folds, choose=False)
    assert answered.mean() > np.mean([not d.abstain for d in decisions(alone, cheap)])


@pytest.mark.parametrize("binary", [True, False])
def test_the_start_counts_the_errors_the_test_itself_allows(binary: bool) -> None:
    counts = np.array([300, 1200, 3200])
    allowed = _allowed_errors(counts, 0.01, 0.1, binary)
    for n, k in zip(counts, allowed, strict=True):
        assert k >= 0
        passes = risk_p_values(np.array([k / n, (k + 1) / n]), np.array([n, n], dtype=float), 0.01, binary)
        assert passes[0] <= 0.1 < passes[1]  # k mistakes pass, one more fails
    if not binary:  # Hoeffding–Bentkus allows fewer than the exact binomial tail
        assert (allowed <= _allowed_errors(counts, 0.01, 0.1, True)).all()


def test_with_a_temperature_either_start_can_certify_each_at_half_the_level() -> None:
    n = 3000
    conf = np.r_[np.linspace(1.0, 0.99999, 2800), np.linspace(0.99, 0.9, 200)]
    pred = np.zeros(n, dtype=np.int64)
    y = pred.copy()
    y[[5, 2850, 2900, 2950]] = 1  # one confident mistake near the top, the rest among the least confident
    loss = np.array([[0.0, 1.0], [1.0, 0.0]])
    plain = Stage(conf, pred, np.ones(n, dtype=bool))
    soft = replace(plain, expected=conf**400)  # a temperature that calls the top texts far less sure
    chain = _Chain(y, loss, 0.01, 0.1, True, 200, (), 1)
    both = chain.run(soft, [], (), 0.0)
    halves = [
        replace(chain, level=0.05)._run(s, [], (), 0.0, 0.1) for s in (plain, replace(soft, expected=soft.expected))
    ]
    assert both.delta == 0.1
    assert both.certified == any(h.certified for h in halves)
    assert both.coverage == max([h.coverage for h in halves if h.certified], default=0.0)
    assert both.certified and both.coverage > 0.5


def test_a_served_temperature_scales_the_combiner_and_what_calibration_reads() -> None:
    votes, y = synthetic(900, seed=9)
    votes = {v: softmax(np.log(p) * 2.0, axis=1) for v, p in votes.items()}  # overconfident voters
    folds = fold_ids(y, 3)
    config = ConformalConfig(alpha=0.1, mondrian=[], risk=RiskConfig(target=0.05, delta=0.1))
    plain = fit_policy(votes, y, None, None, CLASSES, HARM, config, folds=folds)
    served = fit_policy(votes, y, None, None, CLASSES, HARM, config, folds=folds, serve_temperature=True)
    t = served.calibration_report["combiner"]["temperature"]
    assert served.calibration_report["combiner"]["temperature_served"] and t != 1.0
    assert not plain.calibration_report["combiner"]["temperature_served"]
    p0, p1 = plain.combine_arrays(votes).probabilities, served.combine_arrays(votes).probabilities
    np.testing.assert_array_equal(p0.argmax(axis=1), p1.argmax(axis=1))  # the same answers
    np.testing.assert_allclose(p1, softmax(np.log(p0) / t, axis=1), atol=1e-4)  # recalibrated confidences
    # calibration read the scaled out-of-fold outputs: softer where t > 1, sharper where t < 1
    softer = served.calibration_scores[0].max(axis=1).mean() < plain.calibration_scores[0].max(axis=1).mean()
    assert softer == (t > 1.0)
    # the config overrides the trainer's choice either way
    off = fit_policy(
        votes,
        y,
        None,
        None,
        CLASSES,
        HARM,
        config.model_copy(update={"serve_temperature": False}),
        folds=folds,
        serve_temperature=True,
    )
    assert not off.calibration_report["combiner"]["temperature_served"]
