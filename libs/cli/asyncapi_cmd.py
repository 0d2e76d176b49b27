"""`flockwatch asyncapi`: write (or check) the AsyncAPI document of the services' messages."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, NoReturn

import typer

MAX_DIFF_LINES = 40


def asyncapi(
    out: Annotated[Path, typer.Option(help="Where the document goes")] = Path("docs/asyncapi.json"),
    check: Annotated[bool, typer.Option("--check", help="Write nothing; exit 1 if OUT is not up to date")] = False,
) -> None:
    """Generate the AsyncAPI 3.0 document of every service's topics and message schemas (FastStream)."""
    from flockwatch.common.asyncapi import render, services_asyncapi

    generated = render(services_asyncapi())
    if not check:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(generated, encoding="utf-8")
        typer.echo(f"wrote {out}")
        return
    if not out.exists():
        _stale(out, "does not exist")
    current = out.read_text(encoding="utf-8")
    if current != generated:
        diff = list(
            difflib.unified_diff(current.splitlines(), generated.splitlines(), str(out), "generated", lineterm="")
        )
        more = len(diff) - MAX_DIFF_LINES
        typer.echo("\n".join(diff[:MAX_DIFF_LINES] + ([f"… {more} more diff lines"] if more > 0 else [])), err=True)
        _stale(out, "differs from what the routes and event models generate")
    typer.echo(f"{out} is up to date")


def _stale(out: Path, problem: str) -> NoReturn:
    typer.echo(f"error: {out} {problem}; regenerate it with `flockwatch asyncapi --out {out}`", err=True)
    raise typer.Exit(1)
