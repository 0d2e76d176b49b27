"""The feedback service's Prometheus metrics (the process-wide registry, next to the bus metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

FEEDBACK = Counter("flockwatch_feedback_total", "Feedback stored (new ids only)", ["kind", "source"])
FEEDBACK_REPEATS = Counter("flockwatch_feedback_repeats_total", "Feedback ids received again (ignored)", ["source"])
FEEDBACK_QUEUED = Counter(
    "flockwatch_feedback_queued_on_bus_total", "HTTP feedback put on the bus because Postgres was unreachable"
)
ROWS = Counter("flockwatch_feedback_rows_stored_total", "Rows written by the bus consumers", ["table"])
REVIEW_QUEUE = Gauge("flockwatch_review_queue_size", "Texts waiting for review")
FLAGGED = Gauge("flockwatch_feedback_flagged", "Corrections flagged as likely label errors")
CONFLICTS = Gauge("flockwatch_feedback_conflicts", "Texts whose reviewers disagree, unresolved")
REVIEWER_AGREEMENT = Gauge("flockwatch_reviewer_agreement", "Pairwise agreement with other reviewers", ["reviewer"])
RULE_FIRES = Gauge("flockwatch_rule_fires", "Texts a regex rule fired on", ["rule"])
RULE_PRECISION = Gauge("flockwatch_rule_precision", "Share of reviewed firings that were right", ["rule"])
RULE_WRONG = Gauge("flockwatch_rule_wrong", "Reviewed firings whose true label contradicts the rule", ["rule"])
RULE_CONFLICTS = Gauge("flockwatch_rule_conflicts", "Firings in conflict", ["rule", "kind"])
