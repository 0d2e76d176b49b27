"""HTTP response bodies of the feedback service (the request body and `FeedbackAccepted` are in `api.py`).

Each describes what its route has always answered: the keys of the store's rows (`store.py`) and of the
reports of `review.py`, `training.py` (label hygiene) and `rulestats.py`. A response model filters: a key left
out here would vanish from the answer, so `tests/integration/test_feedback_contract.py` compares every route
with the code behind it."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from flockwatch.common.labels import LabelSpec
from flockwatch.feedback.model import Status
from pydantic import BaseModel, Field

Thumbs = Literal["up", "down"]


class FeedbackRecord(BaseModel):
    """One stored feedback row."""

    feedback_id: str = Field(description="The idempotency key: the one posted, or the one made for it.")
    seq: int = Field(description="Arrival order (the trainer's watermark).")
    text_id: str
    label: str | None = Field(description="The true label; null for a thumbs alone.")
    thumbs: Thumbs | None
    note: str | None = Field(description="The reviewer's note, PII-scrubbed.", examples=["mail <EMAIL>"])
    reviewer_id: str
    created_at: datetime = Field(description="When the reviewer gave it.")
    received_at: datetime = Field(description="When the service stored it.")
    source: str = Field(description="How it came: http (POST /feedback) or bus.", examples=["http"])
    flagged: bool = Field(description="Label hygiene found it a likely label error: it no longer counts.")
    flag_reason: str | None
    flag_score: float | None = Field(description="The label's out-of-fold probability when it was flagged.")


class GroupFeedback(BaseModel):
    """One feedback within a group."""

    feedback_id: str
    text_id: str
    reviewer_id: str
    label: str | None
    thumbs: Thumbs | None
    flagged: bool
    flag_reason: str | None


class Conflict(BaseModel):
    """A text (its duplicates merged) whose reviewers gave different labels, and what came of it."""

    key: str = Field(description="The group: the text's hash, or `id:<text_id>` while the text is unknown.")
    text_ids: list[str] = Field(description="The ids the text came under.")
    text: str | None = Field(description="The scrubbed text; null while the service has not seen it.")
    status: Status = Field(description="conflict (no strict majority), or resolved (a majority agreed since).")
    label: str | None = Field(description="The agreed label once resolved.")
    votes: dict[str, list[str]] = Field(
        description="Label → the reviewers who gave it (each one's latest, unflagged label).",
        examples=[{"spam": ["ann"], "ham": ["bob"]}],
    )
    thumbs_down: list[str] = Field(description="Reviewers who gave a thumbs down and no label.")
    flagged_feedback: list[str] = Field(description="Feedback ids label hygiene flagged.")
    feedback: list[GroupFeedback] = Field(description="All the group's feedback, oldest first.")


class Conflicts(BaseModel):
    """Texts whose reviewers disagree, unresolved ones first (newest first within each)."""

    unresolved: int = Field(description="How many of `conflicts` are still in conflict.")
    conflicts: list[Conflict]


class RepeatedFeedback(BaseModel):
    """One reviewer giving the same answer on the same text under several feedback ids."""

    text_id: str
    reviewer_id: str
    label: str | None
    thumbs: Thumbs | None
    n: int = Field(description="How many times.")
    ids: list[str] = Field(description="The feedback ids, oldest first.")


class DuplicateText(BaseModel):
    """One text (normalized, scrubbed) stored under several text ids."""

    text_hash: str
    text: str = Field(description="The scrubbed text.")
    n: int = Field(description="How many text ids.")
    text_ids: list[str]
    with_feedback: int = Field(description="How many of those ids have feedback.")


class Duplicates(BaseModel):
    """Repeated feedback and duplicate texts, most repeated first."""

    repeated_feedback: list[RepeatedFeedback]
    duplicate_texts: list[DuplicateText]


class ReviewerAgreement(BaseModel):
    """How a reviewer's latest labels compare with the other reviewers' and the model's."""

    reviewer_id: str
    labels: int = Field(description="Texts the reviewer labelled (latest label per text).")
    flagged: int = Field(description="Of those, flagged as likely label errors.")
    flag_rate: float | None = Field(description="flagged / labels; null without labels.")
    overlap_texts: int = Field(description="Texts another reviewer labelled too.")
    agreement: float | None = Field(description="Share of agreeing pairs on those texts; null without overlap.")
    agreement_with_model: float | None = Field(description="Share of labels equal to the prediction, where known.")


class Reviewers(BaseModel):
    """Every reviewer with a label, by id."""

    reviewers: list[ReviewerAgreement]


class HygieneIssue(BaseModel):
    """A correction whose label the evidence finds unlikely (it was flagged)."""

    index: int = Field(description="Its place among the checked rows.")
    given: str = Field(description="The label the reviewer gave.")
    suggested: str = Field(description="The label the evidence favours.")
    quality: float = Field(description="The probability of the given label (low: likely wrong).", examples=[0.073])
    feedback_id: str


class HygieneDetails(BaseModel):
    """What a label-hygiene run checked and found."""

    method: str = Field(description="How the labels were checked.")
    rows: int = Field(description="Corrections checked.")
    folds: int = Field(description="Cross-validation folds (0 when skipped).")
    skipped: str | None = Field(description="Why nothing was checked (too few rows or classes); null when checked.")
    reviewers: dict[str, float] = Field(
        description="Each reviewer's estimated accuracy (empty when skipped).", examples=[{"ann": 0.97, "bob": 0.66}]
    )
    issues: list[HygieneIssue] = Field(description="The flagged corrections, least likely label first.")


class HygieneRun(HygieneDetails):
    """A label-hygiene run just made: flagged corrections are back in the review queue and out of training."""

    run_id: int
    flagged: int = Field(description="How many corrections this run flagged.")


class StoredHygieneRun(BaseModel):
    """A recorded label-hygiene run."""

    run_id: int
    ran_at: datetime
    method: str
    n_rows: int = Field(description="Corrections checked.")
    n_flagged: int = Field(description="Corrections flagged.")
    details: HygieneDetails


class LastHygiene(BaseModel):
    """The newest label-hygiene run."""

    last_run: StoredHygieneRun | None = Field(description="Null before the first run.")


class QueuedVoter(BaseModel):
    """One voter's part in the decision on a queued text."""

    top: str | None = Field(description="Its most probable class; null when it abstained.")
    probabilities: dict[str, float] | None = Field(description="Class probabilities; null when it abstained.")
    abstain: bool
    abstain_reason: str | None
    evidence: list[str] = Field(description="Why: e.g. the ids of the rules that fired.")
    version: str = Field(description="The version of its model or rules.")


class ReviewItem(BaseModel):
    """A text to review: a reviewer problem (source feedback) or an unsure decision nobody reviewed (model)."""

    text_id: str
    text: str | None = Field(description="The scrubbed text; null while the service has not seen it.")
    prediction: str | None
    confidence: float | None = Field(description="The decision's; null when the service has no decision.")
    abstain: bool | None = Field(description="The arbiter abstained; null when the service has no decision.")
    prediction_set: list[str]
    voters: dict[str, QueuedVoter] = Field(description="Voter name → its output (empty without a decision).")
    disagreement: float = Field(description="In [0, 1]; 1 for a reviewer problem.")
    harm: float = Field(description="The largest harm weight among the classes in play.")
    priority: float = Field(description="disagreement × harm: the queue's order.")
    reasons: list[str] = Field(examples=[["reviewers disagree (ham: bob; spam: ann)"]])
    source: Literal["feedback", "model"]


class ReviewQueue(BaseModel):
    """Texts to review, highest priority first."""

    total: int = Field(description="Everything waiting (reviewer problems and unreviewed decisions), not just `items`.")
    items: list[ReviewItem]


class Labels(BaseModel):
    """The task's classes (empty, and `task` null, when any label is accepted)."""

    task: str | None = Field(examples=["sms"])
    labels: list[LabelSpec]


class RuleConflicts(BaseModel):
    """Texts where a rule met disagreement."""

    with_rules: int = Field(description="A rule claiming another label fired too.")
    with_decision: int = Field(description="The ensemble decided another label.")
    disputed_by_reviewers: int = Field(description="Reviewers disagree on the text.")


class RuleReport(BaseModel):
    """One regex rule: its fires and how often reviewed texts proved it right."""

    rule_id: str
    label: str | None = Field(description="The label it claims; null for a safety floor or review-only rule.")
    fires: int
    labelled: int = Field(description="Fires on texts with a reviewed label its claim can be judged against.")
    correct: int
    wrong: int
    precision: float | None = Field(description="correct / labelled; null before any review.")
    precision_lower_95: float | None = Field(description="Wilson 95 % lower bound of the precision.")
    confusions: dict[str, int] = Field(
        description="True label → how often, on the texts it got wrong.", examples=[{"ham": 3}]
    )
    conflicts: RuleConflicts


class RuleStatsReport(BaseModel):
    """Every rule that fired or is configured, lowest precision bound first."""

    rules: list[RuleReport]


class FeedbackHealth(BaseModel):
    """Liveness, the database and the bus."""

    status: Literal["ok"]
    database: str = Field(description="ok, or why Postgres is unreachable.", examples=["ok"])
    bus: str = Field(description="The bus kind: memory, kafka, redis or nats.", examples=["kafka"])
