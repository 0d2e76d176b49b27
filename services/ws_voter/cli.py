"""`flockwatch lf report`: per-LF coverage, overlaps, conflicts and accuracy; label model vs majority vote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from flockwatch.common.artifacts import ArtifactError
from flockwatch.common.datasets import DataError, deduplicate
from flockwatch.common.labels import LabelConfig
from flockwatch.common.voting import opinions_matrix
from flockwatch.common.yamlconfig import ConfigError
from flockwatch.ws_voter.app import VOTER_LOADERS, load_core
from flockwatch.ws_voter.lfs import LFSet, load_lfs
from flockwatch.ws_voter.model import LABEL_MODEL, MAJORITY, WSModel, lf_summary
from rich.console import Console
from rich.table import Table
from rich.text import Text

lf_app = typer.Typer(help="Inspect labeling functions of the weak-supervision voter.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)


@lf_app.callback()
def _group() -> None:
    """Inspect labeling functions of the weak-supervision voter."""


@lf_app.command("report")
def report(
    data: Annotated[Path, typer.Option(help="CSV or JSONL with a text column (and a label column for accuracy)")],
    labels: Annotated[Path, typer.Option(help="labels.yaml of the task")],
    rules: Annotated[Path | None, typer.Option(help="rules.yaml: each labeled rule is an LF")] = None,
    lfs: Annotated[Path | None, typer.Option(help="lfs.yaml: keyword and voter LFs")] = None,
    models: Annotated[
        Path | None, typer.Option(help="Model bundle: computes voter LFs; without --rules/--lfs, its WS model's LFs")
    ] = None,
    text_col: Annotated[str, typer.Option(help="Column with the text")] = "text",
    label_col: Annotated[str, typer.Option(help="Column with the label (optional in the data)")] = "label",
) -> None:
    """Per LF: source, label, coverage, overlaps, conflicts (and correct/incorrect/accuracy with labels)."""
    try:
        label_config = LabelConfig.load(labels)
        lf_set = _lf_set(label_config, rules, lfs, models)
        texts, y = _read(data, text_col, label_col, label_config)
        outputs = _voter_outputs(lf_set, models, texts, label_config.names)
        model = WSModel.fit(texts, label_config, lf_set, outputs, y=y)
    except (ConfigError, DataError, ArtifactError, ValueError) as exc:
        errors.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
        raise typer.Exit(2) from None
    L = model.label_matrix(texts, outputs)
    index = {c: i for i, c in enumerate(label_config.names)}
    y_idx = np.array([index[v] for v in y]) if y is not None else None
    console.print(_lf_table(lf_set, lf_summary(L, y_idx), len(texts)))
    fired = (L != -1).sum(axis=1)
    console.print(
        f"{len(texts)} texts; at least one LF fires on {(fired >= 1).mean():.1%}, "
        f"at least min_lfs={lf_set.min_lfs} on {(fired >= lf_set.min_lfs).mean():.1%}"
    )
    console.print(_comparison(model.report_))


def _lf_set(labels: LabelConfig, rules: Path | None, lfs: Path | None, models: Path | None) -> LFSet:
    if rules is not None or lfs is not None:
        return load_lfs(labels, rules, lfs)
    core = load_core(models) if models is not None else None
    if not isinstance(core, WSModel):
        raise ConfigError("give --rules and/or --lfs, or --models with a bundle that has a WS model")
    if list(core.classes) != labels.names:
        raise ConfigError(f"the bundle's WS model has classes {core.classes}; the labels file has {labels.names}")
    return core.lfs


def _read(path: Path, text_col: str, label_col: str, labels: LabelConfig) -> tuple[list[str], list[str] | None]:
    """Texts, and their labels when the file has the label column (deduplicated either way)."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    frame = pd.read_json(path, lines=True) if path.suffix in {".jsonl", ".ndjson"} else pd.read_csv(path)
    if text_col not in frame.columns:
        raise DataError(f"{path}: no column {text_col!r}; found {list(frame.columns)}")
    if label_col not in frame.columns:
        texts = list(dict.fromkeys(frame[text_col].dropna().astype(str)))
        return texts, None
    frame = frame.dropna(subset=[text_col, label_col])
    data = deduplicate(frame[text_col].astype(str).tolist(), frame[label_col].astype(str).tolist())
    unknown = sorted(set(data.labels) - set(labels.names))
    if unknown:
        raise DataError(f"{path}: labels not in the label config: {unknown}")
    return data.texts, data.labels


def _voter_outputs(
    lf_set: LFSet, models: Path | None, texts: list[str], classes: list[str]
) -> dict[str, np.ndarray] | None:
    needed = lf_set.needed_voters
    if not needed:
        return None
    if models is None:
        raise ConfigError(f"voter LFs read {needed}: pass --models with a bundle that has those voters")
    out: dict[str, np.ndarray] = {}
    for load in VOTER_LOADERS:
        core = load(models)
        if core is not None and set(core.voters) & set(needed):
            out.update({v: opinions_matrix(ops, classes) for v, ops in core.predict(texts).items() if v in needed})
    missing = sorted(set(needed) - set(out))
    if missing:
        raise ArtifactError(f"{models}: no voter(s) {missing} in the bundle")
    return out


def _lf_table(lf_set: LFSet, rows: list[dict[str, Any]], n: int) -> Table:
    table = Table(title=f"labeling functions ({len(rows)}) on {n} texts")
    table.add_column("LF", overflow="fold", min_width=12)
    table.add_column("source")
    table.add_column("label")
    for name in ("coverage", "overlaps", "conflicts"):
        table.add_column(name, justify="right", max_width=9)
    labeled = bool(rows) and "accuracy" in rows[0]
    if labeled:
        for name in ("correct", "wrong", "emp. acc."):
            table.add_column(name, justify="right", max_width=9)
    for lf_id, source, label, row in zip(lf_set.ids, lf_set.sources, lf_set.lf_labels, rows, strict=True):
        cells = [lf_id, source, label, *(f"{row[c]:.3f}" for c in ("coverage", "overlaps", "conflicts"))]
        if labeled:
            acc = row["accuracy"]
            cells += [str(row["correct"]), str(row["incorrect"]), "-" if acc is None else f"{acc:.3f}"]
        table.add_row(*(Text(c) for c in cells))
    return table


def _comparison(report: dict[str, Any]) -> Table | Text:
    if LABEL_MODEL not in report:
        return Text(f"no labels: the label model is used ({report['reason']}); give labels to compare")
    table = Table(title="label model vs majority vote over the same LFs (texts where >= min_lfs fire)")
    for name in ("method", "macro-F1", "accuracy", "ECE", "Brier", "coverage"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for method in (LABEL_MODEL, MAJORITY):
        r = report[method]
        values = [r[key] for key in ("macro_f1", "accuracy", "ece", "brier", "coverage")]
        mark = " (chosen)" if report["chosen"] == method else ""
        table.add_row(method + mark, *("-" if v is None else f"{v:.3f}" for v in values))
    table.caption = f"chosen: {report['chosen']} ({report['reason']})"
    return table
