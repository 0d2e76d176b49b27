"""Feedback service settings: environment variables `FLOCKWATCH_FEEDBACK_*`, plus the common `FLOCKWATCH_*` ones."""

from __future__ import annotations

from pathlib import Path

from flockwatch.common.settings import CommonSettings
from pydantic import Field


class FeedbackSettings(CommonSettings):
    """Where feedback is stored, where the HTTP API listens, and how texts are queued and checked."""

    feedback_host: str = "127.0.0.1"
    feedback_port: int = Field(8010, ge=0, le=65535, description="HTTP port (0: any free port).")
    feedback_serve_http: bool = Field(True, description="Serve the HTTP API and review page from this service.")
    feedback_database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/test", description="PostgreSQL (asyncpg DSN)."
    )
    feedback_db_schema: str = Field(
        "feedback", pattern=r"^[a-z_][a-z0-9_]{0,62}$", description="Schema that holds the tables."
    )
    feedback_migrate: bool = Field(True, description="Run the alembic migrations at start-up.")
    feedback_pool_size: int = Field(8, ge=1, le=100)
    feedback_db_retry_s: float = Field(60.0, ge=0, description="Retry a bus batch on a lost database this long.")
    feedback_labels: Path | None = Field(None, description="labels.yaml; default: the model bundle's.")
    feedback_rules: Path | None = Field(None, description="rules.yaml; default: the model bundle's.")
    feedback_rule_voter: str = Field("regex", description="The voter whose evidence lists the rule ids that fired.")
    feedback_review_min_set_size: int = Field(2, ge=2, description="Prediction sets this large go to review.")
    feedback_keep_service_numbers: bool = Field(True, description="Keep premium/freephone numbers when scrubbing.")
    feedback_hygiene_every: int = Field(50, ge=0, description="Check labels after this many new corrections (0: off).")
    feedback_hygiene_folds: int = Field(5, ge=2, le=20)
    feedback_hygiene_min_rows: int = Field(20, ge=4, description="Fewer labelled texts: no label-issue check.")
    feedback_metrics_interval_s: float = Field(
        30.0, gt=0, description="How often the database gauges of /metrics are computed (never per scrape)."
    )
    feedback_max_body_bytes: int = Field(65_536, ge=1_024, description="Larger request bodies are refused with 413.")
