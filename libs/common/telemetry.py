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
# outcome vote|abstain; label: the voted class (the most probable), empty for an abstention
VOTES = Counter("flockwatch_votes_total", "Votes cast", ["voter", "outcome", "label"])
# path consensus|combiner|no_votes|escalated; outcome answer|abstain|pending (escalated); label: the answer, or empty
DECISIONS = Counter("flockwatch_decisions_total", "Decisions made", ["path", "outcome", "label"])
DECISION_SECONDS = Histogram(
    "flockwatch_decision_latency_seconds",
    "From a text's submission to its decision",
    ["path"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CASCADE_REQUESTS = Counter(
    "flockwatch_cascade_requests_total", "Votes the arbiter asked of a cascade tier (embedding, LLM)", ["tier", "voter"]
)
REQUESTS_EXPIRED = Counter(
    "flockwatch_vote_requests_expired_total", "Cascade requests that arrived past their deadline", ["service"]
)
IN_FLIGHT = Gauge("flockwatch_gateway_in_flight", "Texts accepted and waiting for a decision")
REFUSED = Counter("flockwatch_gateway_refused_total", "Texts refused by admission control (503)")
CONSUMER_LAG = Gauge(
    "flockwatch_consumer_lag",
    "Messages of a topic its consumer group has not read yet (Redis XINFO GROUPS lag, NATS num_pending, Kafka: end"
    " offset - position of this instance's partitions). scope: group (the whole group's, alike in every instance:"
    " take the max) or instance (this instance's partitions: take the sum)",
    ["topic", "group", "scope"],
)
CONSUMER_PENDING = Gauge(
    "flockwatch_consumer_pending",
    "Entries a consumer group has read but not acknowledged (scope as for flockwatch_consumer_lag)",
    ["topic", "group", "scope"],
)
MODEL_INFO = Gauge("flockwatch_model_info", "Loaded model versions (value 1)", ["component", "version"])
MODEL_CERTIFIED = Gauge(
    "flockwatch_model_certified", "1 when the bundle in force certified its risk target, 0 when it abstains on all"
)
SERVICE_INFO = Gauge("flockwatch_service_info", "Services running in this process (value 1)", ["service", "bus"])
HTTP_REQUESTS = Counter("flockwatch_http_requests_total", "HTTP requests", ["app", "method", "route", "status"])
HTTP_SECONDS = Histogram(
    "flockwatch_http_request_seconds",
    "HTTP request time",
    ["app", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TRAINING_RUNS = Counter("flockwatch_training_runs_total", "Training runs finished", ["status"])
SHADOW_TEXTS = Counter(  # agree, disagree, abstain (either side)
    "flockwatch_trainer_shadow_texts_total", "Live texts a challenger decided in shadow", ["outcome"]
)
ROLLOUT_EVENTS = Counter(  # shadow, promoted, rejected_in_shadow, kept, rolled_back
    "flockwatch_trainer_rollout_total", "Safe-rollout steps: shadow, promotion, live watch, rollback", ["event"]
)
DRIFT_MARTINGALE = Gauge("flockwatch_drift_martingale", "The drift monitor's test martingale (alarm at 1/delta)")
DRIFT_ALARMS = Counter("flockwatch_drift_alarms_total", "Drift alarms raised", ["action"])
AUTH_REFUSED = Counter("flockwatch_http_auth_refused_total", "Requests refused by token checks", ["status"])
RATE_LIMITED = Counter("flockwatch_http_rate_limited_total", "Requests refused over a token's rate limit", ["token"])
RATE_LIMIT_ERRORS = Counter("flockwatch_http_rate_limit_errors_total", "Rate-limit checks skipped (storage down)")
CACHE_LOOKUPS = Counter("flockwatch_gateway_cache_total", "Prediction cache lookups", ["result"])  # hit/miss/error
CACHE_WRITES = Counter("flockwatch_gateway_cache_writes_total", "Decisions offered to the cache", ["result"])
# reason: signature (missing or wrong), outside (not under a models root), bundle (manifest or files do not match)
ANNOUNCEMENTS_REFUSED = Counter(
    "flockwatch_announcements_refused_total", "Model announcements (ModelPublished) refused", ["service", "reason"]
)

_versions: dict[str, str] = {}  # component → the version MODEL_INFO shows


def set_model_version(component: str, version: str) -> None:
    """Mark `version` as the one `component` runs now (a reload drops the old version's series)."""
    old = _versions.get(component)
    if old is not None and old != version:
        MODEL_INFO.remove(component, old)
    _versions[component] = version
    MODEL_INFO.labels(component, version).set(1)
