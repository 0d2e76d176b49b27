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
