"""`flockwatch feedback …`: migrate the schema, check labels, export clean training rows."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

feedback_app = typer.Typer(no_args_is_help=True)
console = Console()
DatabaseOpt = Annotated[str | None, typer.Option(help="PostgreSQL URL (default FLOCKWATCH_FEEDBACK_DATABASE_URL)")]
SchemaOpt = Annotated[str | None, typer.Option(help="Schema (default FLOCKWATCH_FEEDBACK_DB_SCHEMA)")]


def _settings(database_url: str | None, schema: str | None) -> Any:
    from flockwatch.feedback.settings import FeedbackSettings

    overrides = {"feedback_database_url": database_url, "feedback_db_schema": schema}
    return FeedbackSettings(**{k: v for k, v in overrides.items() if v is not None})


@feedback_app.command()
def migrate(database_url: DatabaseOpt = None, schema: SchemaOpt = None) -> None:
    """Create or upgrade the feedback tables (alembic; safe while instances run)."""
    from flockwatch.feedback.migrate import upgrade

    s = _settings(database_url, schema)
    upgrade(s.feedback_database_url, s.feedback_db_schema)
    console.print(f"schema {s.feedback_db_schema}: up to date")


async def _with_store(s: Any, work: Any) -> Any:
    from flockwatch.feedback.config import load_task
    from flockwatch.feedback.store import FeedbackStore

    task = load_task(s.feedback_labels, s.feedback_rules, s.model_dir)
    store = await FeedbackStore.connect(s.feedback_database_url, s.feedback_db_schema, size=2)
    try:
        return await work(store, task)
    finally:
        await store.close()


@feedback_app.command()
def hygiene(database_url: DatabaseOpt = None, schema: SchemaOpt = None) -> None:
    """Flag likely label errors among the corrections now (they go back to the review queue)."""
    from flockwatch.feedback.training import run_hygiene

    s = _settings(database_url, schema)
    result = asyncio.run(
        _with_store(
            s,
            lambda store, task: run_hygiene(store, task.classes, s.feedback_hygiene_folds, s.feedback_hygiene_min_rows),
        )
    )
    console.print(
        f"{result['method']}: {result['rows']} rows, {result['flagged']} flagged"
        + (f" (skipped: {result['skipped']})" if result["skipped"] else "")
    )
    for issue in result["issues"][:20]:
        console.print(
            f"  {issue['feedback_id']}: given {issue['given']}, suggested {issue['suggested']} "
            f"(p={issue['quality']:.2f})"
        )


@feedback_app.command()
def export(
    out: Annotated[Path, typer.Option(help="CSV to write (columns text,label) for `flockwatch train --data`")],
    since_seq: Annotated[int, typer.Option(help="Only texts with feedback newer than this watermark")] = 0,
    check: Annotated[bool, typer.Option("--hygiene/--no-hygiene", help="Run the label check first")] = True,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Write the clean training rows (resolved, unflagged, scrubbed) and print the new watermark."""
    from flockwatch.feedback.training import clean_training_rows

    s = _settings(database_url, schema)
    rows = asyncio.run(
        _with_store(
            s,
            lambda store, task: clean_training_rows(
                store,
                task.classes,
                since_seq=since_seq,
                hygiene=check,
                folds=s.feedback_hygiene_folds,
                min_rows=s.feedback_hygiene_min_rows,
            ),
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows.rows)
    console.print(f"wrote {len(rows.rows)} rows to {out}; watermark {rows.watermark}; excluded {rows.excluded}")


@feedback_app.command()
def disagreements(
    out: Annotated[Path, typer.Option(help="JSONL to write: one review item per line, highest priority first")],
    limit: Annotated[int, typer.Option(min=1, help="Items at most")] = 500,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Export the review queue: reviewer conflicts and flagged labels, then the decisions the voters
    disagreed on or the ensemble was unsure of (disagreement × harm), as the review page orders them."""
    import json

    from flockwatch.feedback.review import review_queue

    s = _settings(database_url, schema)
    queue = asyncio.run(_with_store(s, lambda store, task: review_queue(store, task, limit=limit)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for item in queue["items"]:
            f.write(json.dumps(item, default=str, ensure_ascii=False) + "\n")
    console.print(f"wrote {len(queue['items'])} of {queue['total']} items to review to {out}")
