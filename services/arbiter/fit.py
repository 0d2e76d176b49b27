"""Fit the arbiter: combiner on out-of-fold train outputs; conformal sets and thresholds on calibration scores.

Two ways to get calibration scores. *Held out* (`cal` given): a calibration split that no voter nor the
combiner trained on, so its scores are exchangeable with future texts' (exact split-conformal validity).
*Cross-fitted* (`cal` None, `folds` given): every labeled text is scored by voters and a combiner fitted
without its fold, and those out-of-fold scores calibrate the sets and λ (cross-conformal: the deployed
models are refitted on all rows, so the guarantee is approximate; `benchmarks/quality.py --validity`
checks it over repeated splits). One conformal stage is calibrated per cascade round: `cheap` (the cascade
voters absent: what most texts are decided on), then `tier1`, `tier2`, … (the votes of the rounds up to
that tier, on the calibration texts that tier's voters voted on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flockwatch.arbiter.combiner import CONSENSUS, NO_VOTES, Combined, combine
from flockwatch.arbiter.config import ConformalConfig
from flockwatch.arbiter.conformal import MondrianSets
from flockwatch.arbiter.model import CHEAP, ArbiterPolicy, active_tiers, memberships, stage_name
from flockwatch.arbiter.risk import Stage, choose_thresholds, harm_loss
from flockwatch.arbiter.select import Selection, select_combiner
from flockwatch.arbiter.stacker import Array, Stacker, stack_votes
from flockwatch.common.metrics import has_opinion
from flockwatch.common.slices import SliceConfig
from numpy.typing import NDArray

Labels = NDArray[np.int64]


def fit_policy(
    oof: Mapping[str, Array],
    y_train: Labels,
    cal: Mapping[str, Array] | None,
    y_cal: Labels | None,
    classes: list[str],
    harm: Mapping[str, float],
    config: ConformalConfig,
    *,
    cal_texts: Sequence[str] | None = None,
    slices: SliceConfig | None = None,
    version: str = "1",
    stacker: Stacker | None = None,
    folds: NDArray[np.int64] | None = None,
    choose: bool = True,
    serve_temperature: bool = False,
) -> ArbiterPolicy:
    """Fit the combiner, calibrate the conformal stages, then choose the answer and escalation thresholds.

    `folds` (a fold number per train row, the voters' own): choose the combiner by out-of-fold macro-F1
    (`choose` False: the given stacker, cross-fitted).
    `cal` None: cross-fitted calibration on the train rows themselves (needs `folds`; `cal_texts` are then
    the train texts).
    `serve_temperature`: scale the chosen combiner by its out-of-fold temperature (`config.serve_temperature`,
    when set, decides instead); the conformal sets and thresholds are then calibrated on the scaled outputs.
    """
    y_train = np.asarray(y_train, dtype=np.int64)
    tiers = active_tiers(config, list(oof))
    cascade = tuple(v for voters, _ in tiers for v in voters)
    base = stacker if stacker is not None else Stacker(rare=cascade)
    if folds is not None:
        selection = select_combiner(oof, y_train, len(classes), np.asarray(folds), base, choose)
    elif cal is None:
        raise ValueError("cross-fitted calibration (cal=None) needs the folds")
    else:
        selection = Selection(base.fit(oof, y_train, len(classes)), "stacker")
    serve = serve_temperature if config.serve_temperature is None else config.serve_temperature
    if serve and selection.temperature != 1.0:
        selection = selection.serve_temperature()
    fitted = selection.stacker
    crossfitted = cal is None
    if cal is None or y_cal is None:
        cal, y_cal = oof, y_train
    y_cal = np.asarray(y_cal, dtype=np.int64)
    texts = list(cal_texts) if cal_texts is not None else [None] * len(y_cal)
    groups = memberships(slices, texts)
    names = [s.name for s in slices.slices] if slices else []
    fit_sets = _set_fitter(y_cal, groups, names, classes, config)
    sets: dict[str, MondrianSets] = {}
    stages: list[Stage] = []
    rounds: list[Combined] = []
    for r in range(len(tiers) + 1):  # round r decides with the every-text voters and tiers 1…r
        later = {v for voters, _ in tiers[r:] for v in voters}
        votes = {v: p for v, p in cal.items() if v not in later}
        if crossfitted:
            assert folds is not None
            rounds.append(_crossfitted(selection.fold_stackers, np.asarray(folds), votes, config))
        else:
            rounds.append(_combined(fitted, votes, config))
        rows = np.ones(len(y_cal), dtype=bool) if r == 0 else _any_present(cal, tiers[r - 1][0])
        sets[stage_name(r)] = fit_sets(rounds[r], rows)
        matrix = _set_matrix(rounds[r], sets[stage_name(r)], groups)
        stages.append(
            Stage.from_sets(
                rounds[r].probabilities,
                matrix,
                config.answer_requires_singleton,
                temperature=1.0 if selection.served else selection.temperature,
            )
        )
    cheap, cheap_stage = rounds[0], stages[0]
    loss = harm_loss(classes, harm, config.risk.harm_weighted)
    choice = choose_thresholds(
        stages,
        y_cal,
        loss,
        config.risk.target,
        config.risk.delta,
        config.risk.grid,
        budgets=[budget for _, budget in tiers],
        starts=config.risk.starts,
    )
    policy = ArbiterPolicy(
        classes=list(classes),
        harm={c: float(harm[c]) for c in classes},
        stacker=fitted,
        expected_voters=list(oof),
        config=config,
        sets=sets,
        slices=slices,
        answer_at=choice.answer_at,
        escalate_at=choice.escalate_at,
        escalate_below=choice.escalate_below,
        version=version,
    )
    answered = cheap_stage.singleton & (cheap_stage.confidence >= choice.answer_at)
    policy.calibration_scores = (cheap.probabilities, answered, y_cal)
    policy.calibration_report = {
        "n": len(y_cal),
        "risk": choice.to_dict(),
        "conformal": {stage: s.report for stage, s in sets.items()},
        "set_coverage": _coverage(cheap_stage, _set_matrix(cheap, sets[CHEAP], groups), cheap, y_cal),
        "consensus_rate": float((cheap.path == CONSENSUS).mean()) if len(y_cal) else 0.0,
        "stacker_voters": list(fitted.voters_),
        "combiner": selection.report(),
        "scheme": "cross-fitted" if crossfitted else "held-out",
        "cascade_voters": list(cascade),
        "cascade_tiers": [{"voters": voters, "budget": budget} for voters, budget in tiers],
    }
    return policy


def _combined(stacker: Stacker, votes: Mapping[str, Array], config: ConformalConfig) -> Combined:
    return combine(stacker, *stack_votes(stacker.voters_, votes), config.consensus_min_prob)


def _crossfitted(
    fold_stackers: Sequence[Stacker], folds: NDArray[np.int64], votes: Mapping[str, Array], config: ConformalConfig
) -> Combined:
    """Each fold's rows combined by the combiner fitted without that fold."""
    if len(fold_stackers) != len(np.unique(folds)):
        raise ValueError("cross-fitted calibration needs one fitted combiner per fold")
    n, k = len(folds), len(fold_stackers[0].intercept_)
    probs, path = np.full((n, k), np.nan), np.zeros(n, dtype=np.int8)
    for f, model in zip(np.unique(folds), fold_stackers, strict=True):
        rows = folds == f
        part = _combined(model, {v: p[rows] for v, p in votes.items()}, config)
        probs[rows], path[rows] = part.probabilities, part.path
    return Combined(probs, path)


def _any_present(votes: Mapping[str, Array], voters: Sequence[str]) -> NDArray[np.bool_]:
    n = len(next(iter(votes.values())))
    out = np.zeros(n, dtype=bool)
    for v in voters:
        if v in votes:
            out |= has_opinion(votes[v])
    return out


def _set_fitter(
    y: Labels, groups: list[list[str] | None], names: list[str], classes: list[str], config: ConformalConfig
) -> Any:
    def fit(combined: Combined, rows: NDArray[np.bool_]) -> MondrianSets:
        keep = rows & (combined.path != NO_VOTES)  # texts without votes always abstain: not calibrated
        idx = np.flatnonzero(keep)
        return MondrianSets.fit(
            combined.probabilities[idx],
            y[idx],
            [groups[i] or [] for i in idx],
            names,
            classes,
            config.alpha,
            config.method,
            config.mondrian,
            config.min_group_size,
        )

    return fit


def _set_matrix(combined: Combined, sets: MondrianSets, groups: list[list[str] | None]) -> NDArray[np.bool_]:
    """(n, k) conformal sets of the calibration texts (empty rows where no voter voted)."""
    p = combined.probabilities
    voted = combined.path != NO_VOTES
    s = np.zeros(p.shape, dtype=bool)
    if voted.any():
        s[voted] = sets.predict_sets(p[voted], [groups[i] for i in np.flatnonzero(voted)])
    return s


def _coverage(stage: Stage, matrix: NDArray[np.bool_], combined: Combined, y: Labels) -> dict[str, float]:
    voted = combined.path != NO_VOTES
    if not voted.any():
        return {"coverage": 0.0, "singleton_rate": 0.0}
    s = matrix[voted]
    return {
        "coverage": float(s[np.arange(len(s)), y[voted]].mean()),
        "mean_size": float(s.sum(axis=1).mean()),
        "singleton_rate": float(stage.singleton.mean()),
    }
