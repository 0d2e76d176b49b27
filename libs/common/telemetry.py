"""Prometheus metrics shared by every service (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_IN = Counter("flockwatch_messages_in_total", "Messages consumed", ["topic", "group"])
MESSAGES_OUT = Counter("flockwatch_messages_out_total", "Messages published", ["topic"])
DUPLICATES = Counter("flockwatch_duplicates_total", "Redelivered messages dropped", ["topic", "group"])
DEAD_LETTERS = Counter("flockwatch_dead_letters_total", "Messages sent to the dead-letter topic", ["topic", "group"])
BATCH_SIZE = Histogram(
    "flockwatch_batch_size",
    "Messages per handler call",
    ["group"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
HANDLER_SECONDS = Histogram(
    "flockwatch_handler_seconds",
    "Handler time per batch",
    ["group"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
VOTES = Counter("flockwatch_votes_total", "Votes cast", ["voter", "outcome"])
DECISIONS = Counter("flockwatch_decisions_total", "Decisions made", ["path", "outcome"])
IN_FLIGHT = Gauge("flockwatch_gateway_in_flight", "Texts accepted and waiting for a decision")
REFUSED = Counter("flockwatch_gateway_refused_total", "Texts refused by admission control (503)")
MODEL_INFO = Gauge("flockwatch_model_info", "Loaded model versions (value 1)", ["component", "version"])
