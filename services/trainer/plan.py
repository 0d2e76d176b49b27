"""Which voters run on every text and which wait in the cascade: chosen by certified coverage per CPU-ms.

With `budget.cpu_ms_per_text` in `conformal.yaml`, each plan promotes the first k cascade tiers
(cheapest first) to every-text voters, k = 0 … all; each is fitted and certified on the calibration
scores, and costs what its every-text voters cost plus each remaining tier's cost times the share of texts
reaching it. The plan with the most certified coverage within the budget wins (near ties, within half a
point: the cheaper); with nothing certified anywhere, the most accurate one within the budget. Voters'
costs are measured at training time on a sample of the training texts, as the services batch them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flockwatch.arbiter.config import CascadeConfig, ConformalConfig
from flockwatch.arbiter.model import ArbiterPolicy

COST_SAMPLE = 256  # training texts timed per voter core
COST_BATCH = 64
NEAR_TIE = 0.005


@dataclass
class Plan:
    """The chosen policy, the configuration it was fitted with (cascade tiers as decided), and the report."""

    policy: ArbiterPolicy
    config: ConformalConfig
    report: dict[str, Any]


Costs = dict[tuple[str, ...], float]  # the voters of one core → its CPU-ms per text


def measure_costs(bundle: Path, texts: Sequence[str]) -> Costs:
    """CPU-ms per text of each voter core of a (staging) bundle, timed on up to COST_SAMPLE texts in batches."""
    from flockwatch.trainer.evaluate import load_cores

    sample = list(texts[:COST_SAMPLE])
    costs: Costs = {}
    for core in load_cores(bundle):
        core.predict(sample[:8])  # first call: lazy set-up, not a per-text cost
        start = time.process_time()
        for at in range(0, len(sample), COST_BATCH):
            core.predict(sample[at : at + COST_BATCH])
        costs[tuple(core.voters)] = round((time.process_time() - start) * 1000 / max(len(sample), 1), 3)
    return costs


def cost_of(voters: Sequence[str], costs: Costs) -> float:
    """CPU-ms per text of running these voters: each core they need, once."""
    return sum(ms for core, ms in costs.items() if set(core) & set(voters))


def choose_plan(fit: Callable[[ConformalConfig], ArbiterPolicy], config: ConformalConfig, costs: Costs) -> Plan:
    """Fit every plan with `fit` and keep the best within `config.budget` (no budget: the configured one)."""
    if config.budget is None or not config.cascade.tiers:
        policy = fit(config)
        return Plan(policy, config, {})
    tiers = config.cascade.tiers
    rows = []
    plans: list[tuple[ArbiterPolicy, ConformalConfig]] = []
    for k in range(len(tiers) + 1):
        plan_config = config.model_copy(
            update={"cascade": CascadeConfig(tiers=tiers[k:], deadline_ms=config.cascade.deadline_ms)}
        )
        policy = fit(plan_config)
        risk = policy.calibration_report["risk"]
        every = [v for v in policy.expected_voters if v not in policy.cascade_voters]
        cost = cost_of(every, costs)
        reach = risk.get("reach", [])
        for r, tier in enumerate(policy.tiers):
            cost += (reach[r] if r < len(reach) else 0.0) * cost_of(tier, costs)
        combiner = policy.calibration_report.get("combiner", {})
        chosen = combiner.get("candidates", {}).get(combiner.get("chosen"), {})
        rows.append(
            {
                "every_text": every,
                "cascade": [list(t) for t in policy.tiers],
                "certified": bool(risk["certified"]),
                "coverage": float(risk["coverage"]),
                "cpu_ms_per_text": round(cost, 3),
                "within_budget": cost <= config.budget.cpu_ms_per_text,
                "oof_macro_f1": chosen.get("macro_f1"),
            }
        )
        plans.append((policy, plan_config))
    best = _best(rows)
    policy, chosen_config = plans[best]
    report = {
        "budget_cpu_ms_per_text": config.budget.cpu_ms_per_text,
        "costs": {"+".join(core): ms for core, ms in costs.items()},
        "plans": rows,
    }
    report["chosen"] = best
    policy.calibration_report["plan"] = report
    return Plan(policy, chosen_config, report)


def _best(rows: list[dict[str, Any]]) -> int:
    """The index of the best plan: most coverage within budget (near ties: cheaper), else most accurate."""
    affordable = [i for i, r in enumerate(rows) if r["within_budget"]] or [
        int(np.argmin([r["cpu_ms_per_text"] for r in rows]))
    ]
    top = max(rows[i]["coverage"] for i in affordable)
    if top > 0:
        near = [i for i in affordable if rows[i]["coverage"] >= top - NEAR_TIE]
        return min(near, key=lambda i: rows[i]["cpu_ms_per_text"])
    return max(affordable, key=lambda i: (rows[i]["oof_macro_f1"] or 0.0, -rows[i]["cpu_ms_per_text"]))
