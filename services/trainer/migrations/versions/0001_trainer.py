"""Training runs (status, progress, gate decision with its numbers) and drift alarms.

Revision ID: t0001
Revises:
Create Date: 2026-12-01
"""

from alembic import op

revision = "t0001"
down_revision = None
branch_labels = None
depends_on = None


STATEMENTS = """
        CREATE TABLE training_runs (
            run_id            text PRIMARY KEY,
            seq               bigserial UNIQUE,           -- queue order
            kind              text NOT NULL CHECK (kind IN ('full', 'recalibrate')),
            trigger           text NOT NULL,              -- command, corrections, schedule, drift
            reason            text,
            status            text NOT NULL CHECK (status IN ('queued', 'running', 'gated', 'published', 'rejected',
                                                              'failed', 'cancelled')),
            progress          text,
            requested_at      timestamptz NOT NULL DEFAULT now(),
            started_at        timestamptz,
            finished_at       timestamptz,
            champion_version  text,
            candidate_version text,
            published_version text,
            feedback_watermark bigint,                    -- the newest feedback seq the run's data reflects
            data              jsonb,                      -- base rows, corrections, relabelled, added, held-out
            gate              jsonb,                      -- every check with its numbers, and the decision
            metrics           jsonb,
            durations         jsonb,
            error             text
        );
        CREATE INDEX training_runs_status ON training_runs (status, seq);

        CREATE TABLE drift_events (
            event_id       bigserial PRIMARY KEY,
            at             timestamptz NOT NULL DEFAULT now(),
            model_version  text NOT NULL,
            n_reference    integer NOT NULL,
            n_live         integer NOT NULL,
            martingale     double precision NOT NULL,
            ks             jsonb NOT NULL,
            action         text NOT NULL,                 -- recalibrate, full, none
            run_id         text
        )
"""


def upgrade() -> None:
    # asyncpg prepares each statement: one command per execute
    for statement in STATEMENTS.split(";"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE drift_events, training_runs")
