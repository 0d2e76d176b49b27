"""Choose the combiner by out-of-fold macro-F1, so the ensemble never loses to its best voter on held-out rows.

The candidates are the blend (the pool's and the stacker's logits averaged), the stacker (multinomial logistic
regression, C and class weights from a small grid), a weighted log-linear pool of all voters, and each every-text
voter alone (temperature-scaled). Each is cross-fitted over the same folds the voters' out-of-fold outputs came
from: fitted on the other folds, it scores the held-out fold. The choice is the one-standard-error rule (Breiman et
al., 1984) with the blend as the default: the first candidate in the order blend, voters alone, pool, stackers
whose out-of-fold macro-F1 is within one bootstrap standard error of the best one's (the paired difference,
resampled over rows), and not below the best voter's. Why not the best score outright: the out-of-fold outputs come
from fold models trained on fewer texts than the served ones, so the out-of-fold ranking of the pool and the
stackers does not carry over to the test file. Replayed on five captured trainings (`benchmarks/policy_replay.py`:
TREC seeds 0-2, the amazon and movie-review sets), the pool won on the test file once (TREC seed 0: 0.917 against
the stacker's 0.903) and the stacker four times (by 0.5-1.2 points), while their out-of-fold scores pointed the
other way as often. Their blend hedges: within 0.8 points of the better one every time, above the simplest-first
rule's choice on all five (TREC 0.918 on average against 0.914; amazon 0.833 against its voter's 0.821). On
nyt3, kept aside to check the rule, the pool is poor and the blend more than one standard error behind the best
stacker, which is chosen (0.638, as before). The winner is refitted on every row. The per-fold fits of the winner
are kept: cross-fitted calibration needs its out-of-fold probabilities.
Last, one temperature is fitted on the winner's out-of-fold probabilities. `Selection.serve_temperature` applies
it to the deployed combiner, which `fit_policy` does when the bundle has the fine-tuned encoder (there it lowered
the test ECE); with TF-IDF voters alone it made the test ECE worse on 4 of 6 real sets (those voters refit on
every text are surer than their out-of-fold outputs), so there it is not served, and the risk test reads it to
place a second start instead (`risk.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flockwatch.arbiter.stacker import Array, Stacker
from flockwatch.common.metrics import fit_temperature, has_opinion
from numpy.typing import NDArray
from sklearn.metrics import f1_score, log_loss

Labels = NDArray[np.int64]
C_GRID = (0.1, 1.0, 10.0)
BOOTSTRAP = 300  # resamples for the standard error of each candidate's out-of-fold macro-F1 gap to the best
MIN_FOLD_ROWS = 20  # fewer rows than this per fold: no selection, the default stacker


@dataclass
class Selection:
    """The chosen combiner fitted on every row, its per-fold fits, and every candidate's out-of-fold score."""

    stacker: Stacker
    name: str
    fold_stackers: list[Stacker] = field(default_factory=list)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    temperature: float = 1.0
    served: bool = False  # the temperature scales what is served (and the fold fits calibration reads)

    def report(self) -> dict[str, Any]:
        """JSON-ready: the winner, its out-of-fold temperature (and whether it is served) and each candidate's
        out-of-fold macro-F1 and log loss."""
        return {
            "chosen": self.name,
            "temperature": round(self.temperature, 4),
            "temperature_served": self.served,
            "candidates": self.scores,
        }

    def serve_temperature(self) -> Selection:
        """The combiner and its fold fits temperature-scaled (in place: this selection's stackers are the same
        objects): same answers, the out-of-fold confidences matched to the out-of-fold accuracy, and the
        calibration reads the scaled fold fits, as served."""
        t = self.temperature
        return Selection(
            self.stacker.scale(t), self.name, [f.scale(t) for f in self.fold_stackers], self.scores, t, True
        )


def candidates(voters: Sequence[str], rare: Sequence[str], base: Stacker) -> dict[str, Callable[[], Stacker]]:
    """Named factories in the rule's order of preference: the blend, then the simplest first (exact ties go to
    the earlier one)."""
    params = base.get_params()
    # the blend of the pool and the stacker first: the rule's default (see the module docstring)
    out: dict[str, Callable[[], Stacker]] = {"blend": _factory(params, kind="blend", only=None, class_weight=None)}
    for v in voters:
        if v not in rare:
            out[f"voter:{v}"] = _factory(params, kind="pool", only=v)
    out["pool"] = _factory(params, kind="pool", only=None)
    for c in C_GRID:
        for weight in (None, "balanced"):
            name = f"stacker:C={c:g}" + (",balanced" if weight else "")
            out[name] = _factory(params, kind="logistic", C=c, class_weight=weight, only=None)
    return out


def _factory(params: dict[str, Any], **update: Any) -> Callable[[], Stacker]:
    return lambda: Stacker(**{**params, **update})


def fold_ids(y: Sequence[Any] | NDArray[Any], folds: int, seed: int = 0) -> NDArray[np.int64]:
    """A stratified fold number per row (the same assignment for every voter and the combiner)."""
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros(len(y), dtype=np.int64)
    _, counts = np.unique(np.asarray(y, dtype=object), return_counts=True)
    smallest = int(counts.min()) if len(y) else 0
    splits = max(2, min(folds, smallest))
    for f, (_, held) in enumerate(StratifiedKFold(splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)):
        out[held] = f
    return out


def select_combiner(
    oof: Mapping[str, Array],
    y: Labels,
    n_classes: int,
    folds: NDArray[np.int64],
    base: Stacker,
    choose: bool = True,
) -> Selection:
    """Cross-fit every candidate over `folds`; refit the best (by out-of-fold macro-F1) on every row.

    `choose` False, or too few rows per fold to compare: `base` itself, cross-fitted.
    """
    voters = list(oof)
    y = np.asarray(y, dtype=np.int64)
    if not choose or len(np.unique(folds)) < 2 or np.bincount(folds).min() < MIN_FOLD_ROWS:
        params = base.get_params()
        fold_fits = (
            crossfit(lambda: Stacker(**params), oof, y, n_classes, folds)[1] if len(np.unique(folds)) > 1 else []
        )
        why = "stacker" if not choose else "stacker (too few rows to choose)"
        return Selection(base.fit(oof, y, n_classes), why, fold_fits)
    scores: dict[str, dict[str, float]] = {}
    fits: dict[str, list[Stacker]] = {}
    oof_probs: dict[str, Array] = {}
    for name, make in candidates(voters, base.rare, base).items():
        oof_probs[name], fits[name] = crossfit(make, oof, y, n_classes, folds)
        probs = oof_probs[name]
        scored = ~np.isnan(probs).any(axis=1)
        pred = probs[scored].argmax(axis=1)
        scores[name] = {
            "macro_f1": float(f1_score(y[scored], pred, average="macro", labels=range(n_classes), zero_division=0)),
            "log_loss": float(log_loss(y[scored], np.clip(probs[scored], 1e-12, 1), labels=range(n_classes))),
        }
    best = one_standard_error(y, {name: answers(probs) for name, probs in oof_probs.items()}, scores, n_classes)
    chosen = candidates(voters, base.rare, base)[best]().fit(oof, y, n_classes)
    return Selection(chosen, best, fits[best], scores, oof_temperature(oof_probs[best], y))


def answers(probs: Array) -> Labels:
    """The argmax class of each row; -1 where the row has no output (NaN: no votes)."""
    return np.where(np.isnan(probs).any(axis=1), -1, np.nan_to_num(probs).argmax(axis=1))


def macro_f1(y: Labels, pred: Labels, k: int) -> float:
    """Macro-F1 over the k classes from the confusion counts; a row without an answer (-1) is a miss."""
    pred = np.where(pred < 0, k, pred)  # an extra column: counts against recall, not any class's precision
    cm = np.bincount(y * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)
    denom = cm[:, :k].sum(axis=0) + cm.sum(axis=1)
    return float(np.mean(np.where(denom > 0, 2 * np.diag(cm[:, :k]) / np.maximum(denom, 1), 0.0)))


def one_standard_error(
    y: Labels, preds: Mapping[str, Labels], scores: dict[str, dict[str, float]], k: int, seed: int = 0
) -> str:
    """The simplest candidate (`preds` is ordered simplest first) whose out-of-fold macro-F1 is within one
    bootstrap standard error of the best's and not below the best voter's; adds `se` (the standard error of
    its gap to the best, resampling rows) to `scores`."""
    names = list(preds)
    f1 = {name: macro_f1(y, pred, k) for name, pred in preds.items()}
    best = max(names, key=f1.__getitem__)  # max keeps the first of exact ties
    floor = max((f1[n] for n in names if n.startswith("voter:")), default=0.0)
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, len(y), len(y)) for _ in range(BOOTSTRAP)]
    ref = [macro_f1(y[r], preds[best][r], k) for r in rows]
    for name in names:
        gaps = [b - macro_f1(y[r], preds[name][r], k) for r, b in zip(rows, ref, strict=True)]
        scores[name]["se"] = float(np.std(gaps))
    return next((n for n in names if f1[n] >= f1[best] - scores[n]["se"] and f1[n] >= floor), best)


def oof_temperature(probs: Array, y: Labels) -> float:
    """The temperature of out-of-fold combined probabilities (rows without votes ignored; 1.0 with < 2 rows)."""
    rows = ~np.isnan(probs).any(axis=1)
    if rows.sum() < 2:
        return 1.0
    return fit_temperature(np.log(np.clip(probs[rows], 1e-12, 1.0)), y[rows], bounds=(0.25, 4.0))


def crossfit(
    make: Callable[[], Stacker], oof: Mapping[str, Array], y: Labels, n_classes: int, folds: NDArray[np.int64]
) -> tuple[Array, list[Stacker]]:
    """Out-of-fold combined probabilities (NaN rows where no voter voted) and the per-fold fits."""
    n = len(y)
    out = np.full((n, n_classes), np.nan)
    fitted = []
    voted = np.zeros(n, dtype=bool)
    for p in oof.values():
        voted |= has_opinion(p)
    for f in np.unique(folds):
        held = folds == f
        model = make().fit({v: p[~held] for v, p in oof.items()}, y[~held], n_classes)
        rows = held & voted
        if rows.any():
            out[rows] = model.predict_proba({v: p[rows] for v, p in oof.items()})
        fitted.append(model)
    return out, fitted
