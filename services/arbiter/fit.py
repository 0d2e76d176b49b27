"""Fit the arbiter: stacker on out-of-fold train outputs; conformal sets and thresholds on the calibration split.

The calibration split is never seen by the voters' or the stacker's training, so its scores are
exchangeable with future texts'. Two conformal stages are calibrated: `cheap` (the cascade voters
absent: what most texts are decided on) and `full` (calibration texts the cascade voters voted on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flockwatch.arbiter.combiner import CONSENSUS, NO_VOTES, Combined, combine
from flockwatch.arbiter.config import ConformalConfig
from flockwatch.arbiter.conformal import MondrianSets
from flockwatch.arbiter.model import CHEAP, FULL, ArbiterPolicy, memberships
from flockwatch.arbiter.risk import Stage, choose_thresholds, harm_loss
from flockwatch.arbiter.stacker import Array, Stacker, stack_votes
from flockwatch.common.metrics import has_opinion
from flockwatch.common.slices import SliceConfig
from numpy.typing import NDArray

Labels = NDArray[np.int64]


def fit_policy(
    oof: Mapping[str, Array],
    y_train: Labels,
    cal: Mapping[str, Array],
    y_cal: Labels,
    classes: list[str],
    harm: Mapping[str, float],
    config: ConformalConfig,
    *,
    cal_texts: Sequence[str] | None = None,
    slices: SliceConfig | None = None,
    version: str = "1",
    stacker: Stacker | None = None,
) -> ArbiterPolicy:
    """Fit the stacker, calibrate the conformal stages, then choose the answer and escalation thresholds."""
    y_train, y_cal = np.asarray(y_train, dtype=np.int64), np.asarray(y_cal, dtype=np.int64)
    cascade = tuple(v for v in config.cascade.voters if v in oof)
    base = stacker if stacker is not None else Stacker(rare=cascade)
    fitted = base.fit(oof, y_train, len(classes))
    cheap_votes = {v: p for v, p in cal.items() if v not in cascade}
    cheap = _combined(fitted, cheap_votes, config)
    texts = list(cal_texts) if cal_texts is not None else [None] * len(y_cal)
    groups = memberships(slices, texts)
    names = [s.name for s in slices.slices] if slices else []
    fit_sets = _set_fitter(y_cal, groups, names, classes, config)
    sets = {CHEAP: fit_sets(cheap, np.ones(len(y_cal), dtype=bool))}
    full_stage = None
    if cascade:
        full = _combined(fitted, cal, config)
        sets[FULL] = fit_sets(full, _any_present(cal, cascade))
        full_stage = Stage.from_sets(full.probabilities, _set_matrix(full, sets[FULL], groups))
    cheap_sets = _set_matrix(cheap, sets[CHEAP], groups)
    cheap_stage = Stage.from_sets(cheap.probabilities, cheap_sets)
    loss = harm_loss(classes, harm, config.risk.harm_weighted)
    choice = choose_thresholds(
        cheap_stage,
        y_cal,
        loss,
        config.risk.target,
        config.risk.delta,
        config.risk.grid,
        full=full_stage,
        budget=config.cascade.budget if cascade else None,
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
    policy.calibration_report = {
        "n": len(y_cal),
        "risk": choice.to_dict(),
        "conformal": {stage: s.report for stage, s in sets.items()},
        "set_coverage": _coverage(cheap_stage, cheap_sets, cheap, y_cal),
        "consensus_rate": float((cheap.path == CONSENSUS).mean()) if len(y_cal) else 0.0,
        "stacker_voters": list(fitted.voters_),
        "cascade_voters": list(cascade),
    }
    return policy


def _combined(stacker: Stacker, votes: Mapping[str, Array], config: ConformalConfig) -> Combined:
    return combine(stacker, *stack_votes(stacker.voters_, votes), config.consensus_min_prob)


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
