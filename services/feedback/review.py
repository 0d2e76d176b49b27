"""What the stored feedback says: groups of corrections per text, the review queue, conflicts, reviewers, rules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flockwatch.feedback import telemetry
from flockwatch.feedback.config import TaskConfig
from flockwatch.feedback.model import HUMAN_DISAGREEMENT, Correction, Resolution, resolve, reviewer_agreement
from flockwatch.feedback.rulestats import RuleStats, rule_stats
from flockwatch.feedback.store import FeedbackStore


@dataclass(frozen=True)
class Group:
    """The feedback on one text, or on several ids of the same (normalized, scrubbed) text."""

    key: str
    rows: list[Mapping[str, Any]]
    resolution: Resolution

    @property
    def text(self) -> str | None:
        """The scrubbed text, when the service has seen it."""
        return next((r["text"] for r in self.rows if r["text"] is not None), None)

    @property
    def text_ids(self) -> list[str]:
        """The text ids with feedback in this group."""
        return sorted({r["text_id"] for r in self.rows})

    @property
    def latest_text_id(self) -> str:
        """The text id of the newest feedback."""
        return str(max(self.rows, key=lambda r: r["seq"])["text_id"])

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the text, what each reviewer said, and the outcome."""
        res = self.resolution
        return {
            "key": self.key,
            "text_ids": self.text_ids,
            "text": self.text,
            "status": res.status,
            "label": res.label,
            "votes": res.votes,
            "thumbs_down": list(res.downs),
            "flagged_feedback": list(res.flagged),
            "feedback": [
                {
                    k: r[k]
                    for k in ("feedback_id", "text_id", "reviewer_id", "label", "thumbs", "flagged", "flag_reason")
                }
                for r in self.rows
            ],
        }


def to_correction(row: Mapping[str, Any]) -> Correction:
    """A feedback row as a correction: a thumbs up confirms the decision's prediction."""
    label = row["label"] or (row["prediction"] if row["thumbs"] == "up" else None)
    return Correction(
        row["feedback_id"],
        row["seq"],
        row["text_id"],
        row["reviewer_id"],
        label,
        down=row["thumbs"] == "down" and label is None,
        flagged=row["flagged"],
    )


def group_rows(rows: Iterable[Mapping[str, Any]]) -> list[Group]:
    """Group feedback rows by text hash (duplicates share it), or by text id while the text is unknown."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        key = row["text_hash"] or f"id:{row['text_id']}"
        grouped.setdefault(key, []).append(row)
    return [Group(key, rs, resolve([to_correction(r) for r in rs])) for key, rs in grouped.items()]


async def feedback_groups(store: FeedbackStore) -> list[Group]:
    """Every group of feedback, resolved."""
    return group_rows(await store.corrections())


def _problem_reasons(group: Group) -> list[str]:
    res = group.resolution
    reasons = []
    if res.status == "conflict":
        said = "; ".join(f"{label}: {', '.join(rs)}" for label, rs in sorted(res.votes.items()))
        reasons.append(f"reviewers disagree ({said}{'; thumbs down: ' + ', '.join(res.downs) if res.downs else ''})")
    if res.flagged and res.status != "resolved":
        flags = [r["flag_reason"] for r in group.rows if r["flagged"] and r["flag_reason"]]
        reasons.append(flags[-1] if flags else "likely label error")
    if res.status == "thumbs_down":
        reasons.append(f"thumbs down ({', '.join(res.downs)}), no label yet")
    if res.status == "unlabelled":
        reasons.append("confirmed an abstention: needs a label")
    return reasons


def _item(
    record: Mapping[str, Any], *, priority: float, disagreement: float, harm: float, reasons: list[str], source: str
) -> dict[str, Any]:
    return {
        "text_id": record["text_id"],
        "text": record["text"],
        "prediction": record["prediction"],
        "confidence": record["confidence"],
        "abstain": record["abstain"],
        "prediction_set": record["prediction_set"] or [],
        "voters": record["voters"] or {},
        "disagreement": disagreement,
        "harm": harm,
        "priority": round(priority, 6),
        "reasons": reasons,
        "source": source,
    }


async def review_queue(
    store: FeedbackStore, task: TaskConfig, limit: int = 20, reviewer: str | None = None
) -> dict[str, Any]:
    """Texts to review, highest disagreement × harm first: reviewer problems (conflicts, flagged labels,
    thumbs down) and decisions the ensemble was unsure of that nobody has reviewed yet."""
    groups = await feedback_groups(store)
    problems = [g for g in groups if g.resolution.status != "resolved"]
    if reviewer:
        problems = [g for g in problems if not any(r["reviewer_id"] == reviewer and not r["flagged"] for r in g.rows)]
    info = await store.decisions_of([g.latest_text_id for g in problems])
    items = []
    for group in problems:
        record = info.get(group.latest_text_id) or {
            k: None for k in ("text", "prediction", "confidence", "abstain", "prediction_set", "voters")
        }
        record = {**dict(record), "text_id": group.latest_text_id, "text": group.text}
        in_play = {
            *group.resolution.votes,
            *(record["prediction_set"] or []),
            *([record["prediction"]] if record["prediction"] else []),
        }
        harm = max((task.harm(c) for c in in_play), default=1.0)
        items.append(
            _item(
                record,
                priority=HUMAN_DISAGREEMENT * harm,
                disagreement=HUMAN_DISAGREEMENT,
                harm=harm,
                reasons=_problem_reasons(group),
                source="feedback",
            )
        )
    seen = {g.key for g in problems}
    for record in await store.model_queue(limit * 3):
        key = record["text_hash"] or f"id:{record['text_id']}"
        if key in seen:
            continue  # one item per text, however many ids it came under
        seen.add(key)
        items.append(
            _item(
                record,
                priority=record["priority"],
                disagreement=record["disagreement"],
                harm=record["harm"],
                reasons=list(record["reasons"]),
                source="model",
            )
        )
    items.sort(key=lambda i: -i["priority"])
    total = len(problems) + await store.model_queue_size()
    telemetry.REVIEW_QUEUE.set(total)
    return {"total": total, "items": items[:limit]}


def conflicts(groups: list[Group]) -> list[dict[str, Any]]:
    """Texts whose reviewers gave different labels (unresolved first), with who said what."""
    disputed = [g for g in groups if g.resolution.disputed]
    telemetry.CONFLICTS.set(sum(g.resolution.status == "conflict" for g in disputed))
    disputed.sort(key=lambda g: (g.resolution.status != "conflict", -g.resolution.latest_seq))
    return [g.summary() for g in disputed]


def reviewers(groups: list[Group]) -> list[dict[str, Any]]:
    """Per-reviewer agreement with the other reviewers, flag rate and agreement with the model."""
    predictions = {r["text_id"]: r["prediction"] for g in groups for r in g.rows}
    stats = reviewer_agreement(([to_correction(r) for r in g.rows] for g in groups), predictions)
    for s in stats:
        if s.agreement is not None:
            telemetry.REVIEWER_AGREEMENT.labels(s.reviewer_id).set(s.agreement)
    telemetry.FLAGGED.set(sum(bool(r["flagged"]) for g in groups for r in g.rows))
    return [s.as_dict() for s in stats]


async def rules_report(store: FeedbackStore, task: TaskConfig) -> list[RuleStats]:
    """Each regex rule's fires, precision against reviewed labels and conflicts; also sets the gauges."""
    groups = await feedback_groups(store)
    label_of = {tid: g.resolution.label for g in groups if g.resolution.label for tid in g.text_ids}
    disputed_ids = {tid for g in groups if g.resolution.disputed for tid in g.text_ids}
    fired = await store.rule_fires_on(sorted(label_of.keys() | disputed_ids))
    disputed: dict[str, int] = {}
    for tid, rule in fired:
        if tid in disputed_ids:
            disputed[rule] = disputed.get(rule, 0) + 1
    with_rules, with_decision = await store.rule_conflicts()
    stats = rule_stats(
        await store.rule_fire_counts(),
        [(rule, label_of[tid]) for tid, rule in fired if tid in label_of],
        task.rules,
        task.harm,
        with_rules,
        with_decision,
        disputed,
    )
    for s in stats:
        telemetry.RULE_FIRES.labels(s.rule_id).set(s.fires)
        telemetry.RULE_WRONG.labels(s.rule_id).set(s.labelled - s.correct)
        if s.precision is not None:
            telemetry.RULE_PRECISION.labels(s.rule_id).set(s.precision)
        for kind, n in s.as_dict()["conflicts"].items():
            telemetry.RULE_CONFLICTS.labels(s.rule_id, kind).set(n)
    return stats
