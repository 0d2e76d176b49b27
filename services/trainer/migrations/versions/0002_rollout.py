"""Safe rollout: runs may wait in shadow; their shadow decisions; the rollout record of a run.

Revision ID: t0002
Revises: t0001
Create Date: 2026-12-07
"""

from alembic import op

revision = "t0002"
down_revision = "t0001"
branch_labels = None
depends_on = None

STATUSES = "'queued', 'running', 'gated', 'shadow', 'published', 'rejected', 'failed', 'cancelled'"
OLD_STATUSES = "'queued', 'running', 'gated', 'published', 'rejected', 'failed', 'cancelled'"

UPGRADE = f"""
        ALTER TABLE training_runs DROP CONSTRAINT training_runs_status_check;
        ALTER TABLE training_runs ADD CONSTRAINT training_runs_status_check CHECK (status IN ({STATUSES}));
        ALTER TABLE training_runs ADD COLUMN rollout jsonb;  -- shadow verdict, watch verdict, rollback
        CREATE TABLE shadow_decisions (
            run_id               text NOT NULL REFERENCES training_runs (run_id) ON DELETE CASCADE,
            text_id              text NOT NULL,
            champion_version     text NOT NULL,            -- the arbiter version that served the text
            champion_prediction  text,                     -- NULL: abstained
            challenger_prediction text,                    -- NULL: abstained
            challenger_confidence double precision NOT NULL,
            scored_at            timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_id, text_id)
        )
"""

DOWNGRADE = f"""
        DROP TABLE shadow_decisions;
        ALTER TABLE training_runs DROP COLUMN rollout;
        UPDATE training_runs SET status = 'rejected' WHERE status = 'shadow';
        ALTER TABLE training_runs DROP CONSTRAINT training_runs_status_check;
        ALTER TABLE training_runs ADD CONSTRAINT training_runs_status_check CHECK (status IN ({OLD_STATUSES}))
"""


def _run(statements: str) -> None:
    # asyncpg prepares each statement: one command per execute
    for statement in statements.split(";"):
        if statement.strip():
            op.execute(statement)


def upgrade() -> None:
    _run(UPGRADE)


def downgrade() -> None:
    _run(DOWNGRADE)
