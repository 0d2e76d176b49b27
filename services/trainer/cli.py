"""`flockwatch models …` (the registry) and `flockwatch retrain` (a run by command, over the trainer's HTTP API)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

models_app = typer.Typer(no_args_is_help=True)
console = Console()
RootOpt = Annotated[Path | None, typer.Option("--models", help="Model root (default: FLOCKWATCH_MODEL_DIR's parent)")]


def _root(models: Path | None) -> Path:
    from flockwatch.trainer.settings import TrainerSettings

    return models if models is not None else TrainerSettings().models_root


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@models_app.command("list")
def list_models(models: RootOpt = None) -> None:
    """Every version: created, parent, headline metrics, gate result; * marks current."""
    from flockwatch.trainer import registry

    root = _root(models)
    table = Table("", "version", "created", "parent", "macro-F1", "ECE", "coverage", "gate")
    for column in table.columns[1:4]:
        column.no_wrap = True
    for m in registry.versions(root):
        row = registry.describe(root, m)
        cells = [row[k] for k in ("version", "created", "parent", "macro_f1", "ece", "coverage", "gate")]
        table.add_row(
            "*" if row["current"] else "",
            *("–" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells),
        )
    console.print(table)


@models_app.command()
def show(version: str, models: RootOpt = None) -> None:
    """A version's manifest (verified), gate decision and history entries."""
    from flockwatch.common.artifacts import ArtifactError, read_manifest
    from flockwatch.trainer import registry

    root = _root(models)
    try:
        directory = registry.version_dir(root, version)
        manifest = read_manifest(directory, verify=True)
    except ArtifactError as exc:
        _fail(str(exc))
        return
    gate_file = directory / registry.GATE_FILE
    out: dict[str, Any] = {"manifest": json.loads(manifest.model_dump_json()), "verified": True}
    out["gate"] = json.loads(gate_file.read_text()) if gate_file.exists() else None
    out["history"] = [e for e in registry.history(root) if e["version"] == version]
    console.print_json(json.dumps(out))


@models_app.command()
def compare(
    a: str,
    b: str,
    models: RootOpt = None,
    data: Annotated[
        Path | None, typer.Option(help="Also run both on this file's test split, with the gate's test")
    ] = None,
) -> None:
    """Two versions side by side: headline and per-class metrics; with --data, the paired gate statistics."""
    from flockwatch.trainer import registry

    root = _root(models)
    dirs = [registry.version_dir(root, v) for v in (a, b)]
    metrics = [json.loads((d / "metrics.json").read_text()) for d in dirs]
    table = Table("metric", a, b, title="each version's metrics.json: its own test split (see n)")
    table.add_row("n", *(str(m.get("n")) for m in metrics))
    for key in ("macro_f1", "macro_f1_all", "worst_slice_f1", "ece", "coverage", "selective_error", "set_coverage"):
        table.add_row(key, *(_fmt(m["ensemble"].get(key)) for m in metrics))
    for cls in metrics[0]["ensemble"].get("per_class_f1", {}):
        table.add_row(f"F1 {cls} (answered)", *(_fmt(m["ensemble"]["per_class_f1"].get(cls)) for m in metrics))
    console.print(table)
    if data is not None:
        from flockwatch.common.datasets import read_table, split
        from flockwatch.trainer.data import HeldOutSet
        from flockwatch.trainer.gate import GateConfig, summary_line
        from flockwatch.trainer.job import gate_candidate

        test = split(read_table(data, "text", "label"))["test"]
        import numpy as np

        held = HeldOutSet(test, np.ones(len(test), dtype=bool), 0)
        result = gate_candidate(dirs[1], dirs[0], held, "full", GateConfig())
        console.print(f"{b} as challenger of {a}: {summary_line(result)}")


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


@models_app.command()
def rollback(
    name: str,
    version: str,
    root: Annotated[Path, typer.Option(help="Where the model roots live (NAME is a folder in it)")] = Path("models"),
) -> None:
    """Point NAME's `current` back at VERSION and announce it (ModelPublished on FLOCKWATCH_BUS_URL)."""
    from flockwatch.common.artifacts import ArtifactError
    from flockwatch.common.settings import CommonSettings
    from flockwatch.trainer import registry

    settings = CommonSettings()
    try:
        target = registry.rollback(root / name, version, by="cli")
    except ArtifactError as exc:
        _fail(str(exc))
        return
    asyncio.run(publish(settings, registry.announcement(target, settings.bundle_key)))
    console.print(f"{name}: current → {version}; announced on {settings.bus_url}")
    if settings.bus_scheme == "memory":
        console.print("[yellow]the bus is memory:// (this process only): running services reload only on restart")


async def publish(settings: Any, event: Any) -> None:
    """Publish one event on the configured bus."""
    from flockwatch.common.bus import create_bus

    bus = create_bus(settings)
    async with bus:
        await bus.publish([event])


def retrain(
    kind: Annotated[str, typer.Option(help="full, or recalibrate (voters frozen)")] = "full",
    reason: Annotated[str | None, typer.Option(help="Why (kept in the run record)")] = None,
    url: Annotated[str | None, typer.Option(help="The trainer's HTTP API (default FLOCKWATCH_TRAINER_URL)")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the run until it finishes")] = False,
    token: Annotated[
        str | None, typer.Option(envvar="FLOCKWATCH_TOKEN", help="An API token with the admin scope (when auth is on)")
    ] = None,
) -> None:
    """Ask the running trainer service for a training run; print its id (and, with --wait, how it ended)."""
    import httpx
    from flockwatch.trainer.settings import TrainerSettings

    base = url or TrainerSettings().trainer_url
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{base}/training", json={"kind": kind, "reason": reason}, headers=headers, timeout=10)
        if response.status_code in (401, 403, 429):
            _fail(f"trainer at {base}: {response.status_code} {response.json().get('detail')}")
        response.raise_for_status()
        run = response.json()
        console.print(f"run {run['run_id']}: {run['status']}")
        while wait and run["status"] in ("queued", "running", "gated"):
            time.sleep(2)
            run = httpx.get(f"{base}/training/{run['run_id']}", headers=headers, timeout=10).json()
            console.print(f"  {run['status']}: {run.get('progress') or ''}")
    except httpx.HTTPError as exc:
        _fail(f"trainer at {base}: {exc}")
    if wait:
        console.print_json(json.dumps({k: run.get(k) for k in ("status", "published_version", "gate", "error")}))
