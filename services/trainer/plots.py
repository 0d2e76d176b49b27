"""PNG plots of an evaluation: F1, slices, reliability, risk–coverage, confusion and voter usage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flockwatch.common.metrics import has_opinion, risk_coverage_curve
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import NDArray
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay

# Figure objects without pyplot: no global state, no GUI backend, safe in threads and tests.
DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _value(x: float | None) -> float:
    return np.nan if x is None else x


def f1_bars(models: dict[str, dict[str, Any]], classes: list[str], path: Path) -> Path:
    """Grouped bars: per-class F1 and macro-F1 of every model (voters, baselines, ensemble)."""
    fig = Figure(figsize=(max(6.0, 1.2 * (len(classes) + 1) * max(1, len(models)) ** 0.5), 4))
    ax = fig.add_subplot()
    groups = [*classes, "macro"]
    width = 0.8 / max(1, len(models))
    for j, (name, m) in enumerate(models.items()):
        heights = [_value(m["per_class_f1"].get(c)) for c in classes] + [_value(m["macro_f1"])]
        ax.bar(np.arange(len(groups)) + j * width - 0.4 + width / 2, heights, width, label=name)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30 if len(groups) > 6 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title("F1 per class (ensemble: answered texts)")
    ax.legend(fontsize="small", ncols=min(4, max(1, len(models))))
    return _save(fig, path)


def slice_bars(slices: dict[str, dict[str, Any]], worst: str | None, path: Path) -> Path:
    """Ensemble macro-F1 per slice, the worst slice highlighted."""
    fig = Figure(figsize=(6, max(2.5, 0.4 * len(slices) + 1)))
    ax = fig.add_subplot()
    if not slices:
        _empty(ax, "no slices configured")
        return _save(fig, path)
    names = list(slices)
    scores = [_value(slices[s]["macro_f1"]) for s in names]
    colors = ["tab:red" if s == worst else "tab:blue" for s in names]
    ax.barh(names, scores, color=colors)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("macro-F1 (answered texts)")
    ax.set_title(f"F1 per slice (worst: {worst})")
    return _save(fig, path)


def reliability(probs: dict[str, NDArray[np.float64]], y: NDArray[np.int64], path: Path) -> Path:
    """Reliability diagram of top-label confidence vs accuracy for every model with opinions."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    drawn = False
    for name, p in probs.items():
        scored = has_opinion(p)
        if not scored.any():
            continue
        confidence = np.clip(p[scored].max(axis=1), 0.0, 1.0)  # float drift past 1.0 makes sklearn raise
        correct = (p[scored].argmax(axis=1) == y[scored]).astype(int)
        CalibrationDisplay.from_predictions(
            correct, confidence, n_bins=15, pos_label=1, name=name, ref_line=not drawn, ax=ax
        )
        drawn = True
    if not drawn:
        _empty(ax, "no model expressed an opinion")
        return _save(fig, path)
    ax.set_xlabel("top-label confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability (15 equal-width bins)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def risk_coverage_plot(
    probs: dict[str, NDArray[np.float64]],
    y: NDArray[np.int64],
    risk_target: float,
    ensemble: dict[str, Any],
    path: Path,
) -> Path:
    """Selective error vs coverage along each model's confidence ranking, with the risk target."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for name, p in probs.items():
        coverage, risk, _ = risk_coverage_curve(p, y)
        if len(coverage):
            ax.plot(coverage, risk, label=name)
    ax.axhline(risk_target, color="grey", linestyle="--", label=f"risk target {risk_target:g}")
    at_target = ensemble["coverage_at_risk_target"]
    ax.axvline(at_target, color="tab:red", linestyle=":", label=f"ensemble coverage at target {at_target:.2f}")
    if ensemble["selective_error"] is not None:
        ax.plot([ensemble["coverage"]], [ensemble["selective_error"]], "k*", markersize=12, label="arbiter")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage")
    ax.set_ylabel("selective error")
    ax.set_title("Risk–coverage (in-sample)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def confusion(matrix: list[list[int]], classes: list[str], path: Path) -> Path:
    """Confusion matrix of the ensemble on the texts it answered (rows: true label)."""
    size = max(4.0, 0.6 * len(classes) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=classes).plot(
        ax=ax, colorbar=False, xticks_rotation=45 if len(classes) > 5 else "horizontal"
    )
    ax.set_title("Confusion (answered texts)")
    return _save(fig, path)


def voter_usage(ensemble: dict[str, Any], path: Path) -> Path:
    """Share of decisions that used each voter, the LLM call rate, and the decision paths."""
    fig = Figure(figsize=(9, 3.8))
    left, right = fig.subplots(1, 2)
    shares = {**ensemble["voter_usage"], "LLM called": ensemble["llm_call_rate"]}
    left.barh(list(shares), list(shares.values()), color=["tab:blue"] * (len(shares) - 1) + ["tab:orange"])
    left.set_xlim(0, 1.05)
    left.set_xlabel("share of texts")
    left.set_title("Voters used by the arbiter")
    paths = ensemble["paths"]
    if paths:
        right.bar(list(paths), list(paths.values()), color="tab:green")
        right.set_ylabel("texts")
        right.set_title("Decision paths")
    else:
        _empty(right, "no decisions")
    return _save(fig, path)
