"""Rich renderings of metrics and decisions."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def metrics_table(metrics: dict[str, Any]) -> Table:
    """Per voter and ensemble: macro-F1, ECE, coverage, selective error (test split)."""
    table = Table(title=f"held-out quality (n={metrics.get('n')})")
    for col in ("model", "macro-F1", "ECE", "coverage", "selective error", "macro-F1 (answered)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = [*metrics.get("voters", {}).items(), ("ensemble", metrics.get("ensemble", {}))]
    for name, r in rows:
        table.add_row(
            name, *(_fmt(r.get(k)) for k in ("macro_f1", "ece", "coverage", "selective_error", "macro_f1_answered"))
        )
    return table
