"""The quality gate: champion vs. challenger on the same held-out texts, by a paired bootstrap.

Both models' forced answers (the top class of the combined probabilities; a text without votes counts as
wrong) are scored on one set of bootstrap resamples of the held-out texts, so each resample gives a paired
difference. A drop is *significant* when the bootstrap p-value of "no drop" is below `alpha`. The
challenger is promoted only if

- macro-F1 does not drop significantly, on the whole held-out set and on its `reference` part (labels from
  the curated base data: corrections cannot vouch for themselves, a poisoned batch would also poison the
  held-out texts it falls on);
- the worst slice's macro-F1 (slices with at least `min_slice_n` texts) does not drop significantly;
- no class's F1 is below `min_class_f1`;
- ECE does not get significantly worse; a calibration-only run (voters frozen) must instead cut ECE by at
  least `calibration_gain` (5 %);
- the share of texts the arbiter answers (coverage under its certified thresholds) does not drop
  significantly by more than `coverage_margin`. Not in the issue's list: without it, a challenger passed
  every other check while its 99 % conformal sets had all become two-class (a few hard new texts among 275
  calibration texts), so it would have answered nothing. The margin lets an honest retrain answer less:
  with 95 % sets, the same retrain answered 72 % instead of 93 % of the held-out texts, at a selective
  error of 0.5 % instead of 2.9 %.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy.stats import binomtest

Kind = Literal["full", "recalibrate"]
Weights = NDArray[np.float64]  # (B, n) resample counts; row 0 is the observed sample (all ones)


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the gate (FLOCKWATCH_TRAINER_GATE_*)."""

    alpha: float = 0.05
    n_boot: int = 2000
    min_class_f1: float = 0.3
    calibration_gain: float = 0.05
    min_slice_n: int = 20
    ece_bins: int = 15
    coverage: bool = True  # also gate the share of texts the arbiter answers …
    coverage_margin: float = 0.25  # … against a drop of more than this (answering less can be honest)
    seed: int = 0


@dataclass(frozen=True)
class HeldOut:
    """The held-out texts both models are judged on: true classes, slice masks, and which labels are curated."""

    y: NDArray[np.int64]
    classes: list[str]
    slices: dict[str, NDArray[np.bool_]] = field(default_factory=dict)
    reference: NDArray[np.bool_] | None = None  # None: every label is curated


@dataclass(frozen=True)
class Check:
    """One criterion of the gate with its numbers."""

    name: str
    passed: bool
    detail: dict[str, Any]


@dataclass(frozen=True)
class GateResult:
    """The decision, every check with its numbers, and why it failed."""

    passed: bool
    kind: Kind
    checks: list[Check]
    n: int
    champion: dict[str, Any] = field(default_factory=dict)
    challenger: dict[str, Any] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        """Names of the failed checks."""
        return [c.name for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for the run record, metrics.json and the manifest)."""
        return {**asdict(self), "reasons": self.reasons}


def _f1_table(w: Weights, pred: NDArray[np.int64], y: NDArray[np.int64], k: int) -> NDArray[np.float64]:
    """(B, k) per-class F1 under each resample's weights; NaN for a class absent from the (resampled) truth.

    Averaging only the classes that occur keeps a slice without spam from scoring 0.5 for one false alarm
    (its ham F1 still counts the false alarm, as a missed ham)."""
    out = np.full((len(w), k), np.nan)
    for c in range(k):
        tp = w @ ((pred == c) & (y == c))
        fp = w @ ((pred == c) & (y != c))
        fn = w @ ((pred != c) & (y == c))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, c] = np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return out


def _macro(w: Weights, pred: NDArray[np.int64], y: NDArray[np.int64], k: int) -> NDArray[np.float64]:
    table = _f1_table(w, pred, y, k)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isnan(table).all(axis=1, keepdims=True), 0.0, table), axis=1)


def _ece(w: Weights, probs: NDArray[np.float64], y: NDArray[np.int64], bins: int) -> NDArray[np.float64]:
    """(B,) top-label ECE (equal-width bins, as `flockwatch.common.metrics`) over the rows with probabilities."""
    scored = ~np.isnan(probs).any(axis=1)
    p = np.nan_to_num(probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y) & scored
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.digitize(conf, edges[1:-1], right=True)
    total = w @ scored
    gap = np.zeros(len(w))
    for b in np.unique(which[scored]):
        member = scored & (which == b)
        gap += np.abs(w @ (correct & member) - w @ (conf * member))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, gap / total, np.nan)


def _forced(probs: NDArray[np.float64]) -> NDArray[np.int64]:
    """Top class per row; -1 (always wrong) where the model had no votes."""
    pred = np.nan_to_num(probs).argmax(axis=1)
    return np.where(np.isnan(probs).any(axis=1), -1, pred).astype(np.int64)


def resample_weights(n: int, n_boot: int, seed: int) -> Weights:
    """Row 0: the observed sample; rows 1…B: multinomial bootstrap counts."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) if n else np.zeros((n_boot, 0))
    return np.vstack([np.ones((1, n)), draws]).astype(np.float64)


def _paired(
    name: str, champion: NDArray[np.float64], challenger: NDArray[np.float64], alpha: float, higher_is_better: bool
) -> Check:
    """Significant worsening? The bootstrap test of Hall and Wilson (1991): the resampled differences, centred
    on the observed one, stand for its distribution under "no change"; p is the share at least as bad as
    observed (+1 smoothing). Uncentred, a challenger that merely loses three texts of 800 would count as a
    significant drop (no resample shows it winning)."""
    delta = challenger - champion
    boot = delta[1:][~np.isnan(delta[1:])]
    if np.isnan(delta[0]) or not len(boot):
        return Check(name, True, {"skipped": "not defined on this held-out set"})
    centred = boot - delta[0]
    as_bad = centred <= delta[0] if higher_is_better else centred >= delta[0]
    p = float((1 + as_bad.sum()) / (1 + len(boot)))
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    detail = {
        "champion": float(champion[0]),
        "challenger": float(challenger[0]),
        "delta": float(delta[0]),
        "ci": [float(lo), float(hi)],
        "p_value": p,
    }
    return Check(name, p >= alpha, detail)


def _worst_slice(
    w: Weights, preds: tuple[NDArray[np.int64], NDArray[np.int64]], held: HeldOut, cfg: GateConfig
) -> tuple[NDArray[np.float64], NDArray[np.float64], list[str]]:
    k = len(held.classes)
    used = [s for s, m in held.slices.items() if m.sum() >= cfg.min_slice_n]
    if not used:
        nan = np.full(len(w), np.nan)
        return nan, nan, []
    champ, chall = (
        np.min(np.stack([_macro(w[:, held.slices[s]], p[held.slices[s]], held.y[held.slices[s]], k) for s in used]), 0)
        for p in preds
    )
    return champ, chall, used


def _summary(
    w: Weights, probs: NDArray[np.float64], pred: NDArray[np.int64], held: HeldOut, cfg: GateConfig
) -> dict[str, Any]:
    one = w[:1]
    per_class = _f1_table(one, pred, held.y, len(held.classes))[0]
    return {
        "macro_f1": float(_macro(one, pred, held.y, len(held.classes))[0]),
        "per_class_f1": {c: None if np.isnan(f) else float(f) for c, f in zip(held.classes, per_class, strict=True)},
        "accuracy": float((pred == held.y).mean()) if len(held.y) else None,
        "ece": float(_ece(one, probs, held.y, cfg.ece_bins)[0]),
    }


@dataclass(frozen=True)
class Outputs:
    """A model's outputs on the held-out texts: combined probabilities (n, k) and, if known, which it answered."""

    probs: NDArray[np.float64]
    answered: NDArray[np.bool_] | None = None


def _coverage(
    w: Weights, champion: Outputs, challenger: Outputs, y: NDArray[np.int64], alpha: float, margin: float
) -> Check:
    """The share of texts the arbiter answers must not drop significantly by more than `margin`."""
    assert champion.answered is not None and challenger.answered is not None
    n = max(len(y), 1)
    champ, chall = w @ champion.answered / n, w @ challenger.answered / n
    shifted = _paired("coverage", champ - margin, chall, alpha, True)  # tests the drop beyond the margin
    plain = _paired("coverage", champ, chall, alpha, True).detail
    detail = {**plain, "p_value": shifted.detail["p_value"], "margin": margin}
    check = Check(shifted.name, shifted.passed, detail)

    def error(o: Outputs) -> float | None:
        a = o.answered
        assert a is not None
        return float((_forced(o.probs)[a] != y[a]).mean()) if a.any() else None

    return Check(check.name, check.passed, {**check.detail, "selective_error": [error(champion), error(challenger)]})


def decide(
    held: HeldOut,
    challenger: NDArray[np.float64] | Outputs,
    champion: NDArray[np.float64] | Outputs | None,
    kind: Kind = "full",
    config: GateConfig | None = None,
) -> GateResult:
    """Gate a challenger against the champion (None: the first model, only the absolute checks apply)."""
    cfg = config or GateConfig()
    n, k = len(held.y), len(held.classes)
    w = resample_weights(n, cfg.n_boot, cfg.seed)
    chall_out = challenger if isinstance(challenger, Outputs) else Outputs(challenger)
    chall_pred = _forced(chall_out.probs)
    chall = _summary(w, chall_out.probs, chall_pred, held, cfg)
    floor = {c: f for c, f in chall["per_class_f1"].items() if f is not None and f < cfg.min_class_f1}
    checks = [Check("class_f1_floor", not floor, {"min": cfg.min_class_f1, "below": floor})]
    if champion is None:
        return GateResult(not floor, kind, checks, n, {}, chall)
    champ_out = champion if isinstance(champion, Outputs) else Outputs(champion)
    champ_pred = _forced(champ_out.probs)
    checks.append(
        _paired("macro_f1", _macro(w, champ_pred, held.y, k), _macro(w, chall_pred, held.y, k), cfg.alpha, True)
    )
    ref = held.reference
    if ref is not None and ref.any() and not ref.all():
        wr = w[:, ref]
        champ_ref, chall_ref = (_macro(wr, p[ref], held.y[ref], k) for p in (champ_pred, chall_pred))
        check = _paired("macro_f1_reference", champ_ref, chall_ref, cfg.alpha, True)
        checks.append(Check(check.name, check.passed, {**check.detail, "n": int(ref.sum())}))
    worst_champ, worst_chall, used = _worst_slice(w, (champ_pred, chall_pred), held, cfg)
    check = _paired("worst_slice_f1", worst_champ, worst_chall, cfg.alpha, True)
    checks.append(Check(check.name, check.passed, {**check.detail, "slices": used}))
    champ_ece = _ece(w, champ_out.probs, held.y, cfg.ece_bins)
    chall_ece = _ece(w, chall_out.probs, held.y, cfg.ece_bins)
    if kind == "recalibrate":
        target = (1 - cfg.calibration_gain) * champ_ece[0]
        detail = {"champion": float(champ_ece[0]), "challenger": float(chall_ece[0]), "required_at_most": target}
        checks.append(Check("ece_gain", bool(chall_ece[0] <= target), detail))
    else:
        checks.append(_paired("ece", champ_ece, chall_ece, cfg.alpha, False))
    if cfg.coverage and champ_out.answered is not None and chall_out.answered is not None:
        checks.append(_coverage(w, champ_out, chall_out, held.y, cfg.alpha, cfg.coverage_margin))
    checks.append(Check("mcnemar", True, mcnemar(champ_pred == held.y, chall_pred == held.y)))
    champ = _summary(w, champ_out.probs, champ_pred, held, cfg)
    return GateResult(all(c.passed for c in checks), kind, checks, n, champ, chall)


def mcnemar(champion_right: NDArray[np.bool_], challenger_right: NDArray[np.bool_]) -> dict[str, Any]:
    """Exact McNemar test on the texts where the two disagree (reported next to the bootstrap, not gating)."""
    b = int((champion_right & ~challenger_right).sum())
    c = int((~champion_right & challenger_right).sum())
    p = float(binomtest(min(b, c), b + c, 0.5).pvalue) if b + c else 1.0
    return {"only_champion_right": b, "only_challenger_right": c, "p_value": p}


def summary_line(result: GateResult | Mapping[str, Any]) -> str:
    """One line for logs and the model card."""
    data = result.to_dict() if isinstance(result, GateResult) else dict(result)
    verdict = "passed" if data["passed"] else f"rejected ({', '.join(data['reasons'])})"
    parts = []
    for check in data["checks"]:
        d = check["detail"]
        if "delta" in d:
            parts.append(f"{check['name']} {d['champion']:.3f}→{d['challenger']:.3f} (p={d['p_value']:.3f})")
    return f"gate {verdict} on {data['n']} held-out texts" + (": " + "; ".join(parts) if parts else "")
