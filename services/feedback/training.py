"""Clean training rows for the trainer: label hygiene first, then one (text, label) per resolved text."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flockwatch.feedback import telemetry
from flockwatch.feedback.hygiene import find_issues
from flockwatch.feedback.model import latest_per_reviewer
from flockwatch.feedback.review import Group, feedback_groups, to_correction
from flockwatch.feedback.store import FeedbackStore


@dataclass(frozen=True)
class TrainingRows:
    """Resolved, unflagged, scrubbed (text, label) rows; `watermark` is the newest feedback seq they reflect."""

    rows: list[tuple[str, str]]
    watermark: int
    excluded: dict[str, int] = field(default_factory=dict)


def hygiene_rows(groups: list[Group], classes: list[str] | None) -> list[tuple[str, str, str, bool, str, str]]:
    """(feedback id, text, effective label, protected, reviewer, text id) for each reviewer's latest unflagged
    label on a known text; protected when another reviewer gave the same label (people who agree outrank the
    model)."""
    out = []
    for group in groups:
        text = group.text
        if text is None:
            continue
        latest = [c for c in latest_per_reviewer(to_correction(r) for r in group.rows) if c.label and not c.flagged]
        agree = Counter(c.label for c in latest)
        for c in latest:
            if c.label is not None and (classes is None or c.label in classes):
                out.append((c.feedback_id, text, c.label, agree[c.label] >= 2, c.reviewer_id, c.text_id))
    return out


async def run_hygiene(
    store: FeedbackStore, classes: list[str] | None, folds: int = 5, min_rows: int = 20
) -> dict[str, Any]:
    """Flag likely label errors among the corrections (they go back to the review queue) and record the run."""
    rows = hygiene_rows(await feedback_groups(store), classes)
    deployed = await store.probabilities_of([r[5] for r in rows])
    report = await asyncio.to_thread(
        find_issues,
        [r[1] for r in rows],
        [r[2] for r in rows],
        protected=[r[3] for r in rows],
        reviewers=[r[4] for r in rows],
        deployed=[deployed.get(r[5]) for r in rows],
        folds=folds,
        min_rows=min_rows,
    )
    flags = [
        (
            rows[i.index][0],
            f"likely label error: given {i.given}, out-of-fold model says {i.suggested} (p={i.quality:.2f})",
            i.quality,
        )
        for i in report.issues
    ]
    details = report.as_dict()
    details["issues"] = [{**issue, "feedback_id": rows[issue["index"]][0]} for issue in details["issues"]]
    run_id = await store.set_flags(flags, report.method, report.rows, details)
    telemetry.FLAGGED.inc(len(flags))
    return {"run_id": run_id, **details, "flagged": len(flags)}


async def clean_training_rows(
    store: FeedbackStore,
    classes: list[str] | None = None,
    *,
    since_seq: int = 0,
    since: datetime | None = None,
    hygiene: bool = True,
    folds: int = 5,
    min_rows: int = 20,
) -> TrainingRows:
    """Training rows from feedback: one per resolved text (duplicates merged), never a flagged correction or
    an unresolved conflict. `since_seq` (a watermark) or `since` (a time) keep the texts whose newest feedback
    came later; `hygiene` runs the label check first."""
    if hygiene:
        await run_hygiene(store, classes, folds, min_rows)
    excluded: Counter[str] = Counter()
    rows: list[tuple[str, str]] = []
    watermark = since_seq
    for group in await feedback_groups(store):
        res = group.resolution
        watermark = max(watermark, res.latest_seq)
        if res.latest_seq <= since_seq or (since and max(r["received_at"] for r in group.rows) <= since):
            continue
        if res.status != "resolved" or res.label is None:
            excluded[res.status] += 1
        elif group.text is None:
            excluded["text_unknown"] += 1
        elif classes is not None and res.label not in classes:
            excluded["label_unknown"] += 1
        else:
            rows.append((group.text, res.label))
    return TrainingRows(rows, watermark, dict(excluded))


def training_rows_sync(dsn: str, schema: str = "feedback", **kwargs: Any) -> TrainingRows:
    """`clean_training_rows` for synchronous callers: opens and closes its own connection pool."""

    async def run() -> TrainingRows:
        store = await FeedbackStore.connect(dsn, schema, size=2)
        try:
            return await clean_training_rows(store, **kwargs)
        finally:
            await store.close()

    return asyncio.run(run())
