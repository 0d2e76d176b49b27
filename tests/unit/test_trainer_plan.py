"""The trainer's plan: which voters run on every text and which wait in the cascade, within a CPU budget."""

from __future__ import annotations

from flockwatch.arbiter.config import Budget, CascadeConfig, ConformalConfig
from flockwatch.arbiter.fit import fit_policy
from flockwatch.arbiter.select import fold_ids
from flockwatch.trainer.plan import choose_plan, cost_of

from tests.unit.test_arbiter_policy import CLASSES, HARM, synthetic
from tests.unit.test_selective_guarantee import THREE_PERCENT

COSTS = {("good",): 0.3, ("fair",): 0.3, ("noise",): 0.2, ("llm",): 40.0}
CASCADE = CascadeConfig(voters=["llm"], budget=0.2)


def _fit(config: ConformalConfig):  # type: ignore[no-untyped-def]
    votes, y = synthetic(1500, seed=40, llm=True)
    return fit_policy(votes, y, None, None, CLASSES, HARM, config, folds=fold_ids(y, 5), choose=False)


def test_a_voter_core_costs_once_whatever_voters_it_serves() -> None:
    assert cost_of(["tfidf_lr", "tfidf_svm"], {("tfidf_lr", "tfidf_svm"): 0.5, ("minilm",): 3.0}) == 0.5


def test_a_generous_budget_runs_the_strong_voter_on_every_text() -> None:
    config = THREE_PERCENT.model_copy(update={"cascade": CASCADE, "budget": Budget(cpu_ms_per_text=50)})
    plan = choose_plan(_fit, config, COSTS)
    rows = plan.report["plans"]
    assert [r["every_text"] for r in rows] == [["good", "fair", "noise"], ["good", "fair", "noise", "llm"]]
    assert rows[1]["coverage"] > rows[0]["coverage"] and rows[1]["cpu_ms_per_text"] == 40.8
    assert plan.config.cascade.tiers == [] and plan.policy.cascade_voters == []
    assert plan.policy.calibration_report["plan"]["chosen"] == 1


def test_a_tight_budget_keeps_the_expensive_voter_in_the_cascade() -> None:
    config = THREE_PERCENT.model_copy(update={"cascade": CASCADE, "budget": Budget(cpu_ms_per_text=10)})
    plan = choose_plan(_fit, config, COSTS)
    assert plan.policy.cascade_voters == ["llm"] and plan.report["plans"][0]["within_budget"]
    assert not plan.report["plans"][1]["within_budget"]


def test_without_a_budget_the_cascade_stays_as_configured() -> None:
    config = THREE_PERCENT.model_copy(update={"cascade": CASCADE})
    plan = choose_plan(_fit, config, COSTS)
    assert plan.report == {} and plan.policy.cascade_voters == ["llm"]
