"""Rich renderings of metrics and decisions."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def metrics_table(metrics: dict[str, Any]) -> Table:
    """Per voter, baseline and the ensemble: macro-F1 (answered / all), ECE, coverage, selective error, LLM calls."""
    table = Table(title=f"held-out quality (n={metrics.get('n')})")
    cols = ("model", "macro-F1", "macro-F1 (all)", "ECE", "coverage", "selective error", "worst slice F1", "LLM calls")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    keys = ("macro_f1", "macro_f1_all", "ece", "coverage", "selective_error", "worst_slice_f1", "llm_call_rate")
    rows = [
        *metrics.get("voters", {}).items(),
        *metrics.get("baselines", {}).items(),
        ("ensemble", metrics.get("ensemble", {})),
    ]
    for name, r in rows:
        table.add_row(name, *(_fmt(r.get(k)) for k in keys))
    return table


def frontier_table(risk: dict[str, Any]) -> Table:
    """The certifiable frontier on the calibration data: error target → coverage certified (and its error)."""
    table = Table(title=f"certifiable frontier (n={risk.get('n')}, δ={risk.get('delta')})")
    for col in ("error target", "certified", "coverage", "calibration error"):
        table.add_column(col, justify="right")
    for p in risk["frontier"]:
        mark = "yes" if p["certified"] else "no"
        asked = " ◀ asked" if p["target"] == risk.get("target") else ""
        table.add_row(f"{p['target']:.1%}{asked}", mark, f"{p['coverage']:.3f}", f"{p['error']:.4f}")
    return table


CROSSFIT_NOTE = (
    "[yellow]Cross-fitted calibration:[/yellow] thresholds fitted on out-of-fold outputs, applied to voters "
    "refit on every text. The bound is approximate: over 20 random SMS splits at 1 % the true risk exceeded the "
    "target in about 20 % of them where δ = 10 % allows (README, Measured). For the exact guarantee train with "
    "--calibration holdout."
)


def certification_lines(risk: dict[str, Any], scheme: str | None = None) -> list[str]:
    """A loud warning when the asked target could not be certified, naming the nearest ones that could; a
    note on what a cross-fitted certificate is worth."""
    if not risk:
        return []
    if risk.get("certified"):
        return [CROSSFIT_NOTE] if scheme == "cross-fitted" else []
    ok = [p["target"] for p in risk.get("frontier", []) if p["certified"] and p["coverage"] > 0]
    near = sorted(ok, key=lambda t: abs(t - risk["target"]))[:3]
    hint = f" Nearest certifiable targets: {', '.join(f'{t:.1%}' for t in sorted(near))}." if near else ""
    return [
        f"[bold red]NOT CERTIFIED:[/bold red] no threshold keeps the error among answered texts ≤ "
        f"{risk['target']:.1%} with probability ≥ {1 - risk['delta']:.0%} on these {risk.get('n')} calibration "
        f"texts. This bundle ABSTAINS ON EVERY TEXT (its /health says so).{hint} Set risk.target in "
        "conformal.yaml to one of them, or add labeled texts."
    ]
