"""Texts (scrubbed), decisions with their review priority, rule firings, feedback, hygiene runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


STATEMENTS = """
        CREATE TABLE texts (
            text_id      text PRIMARY KEY,
            text         text NOT NULL,                -- PII-scrubbed: the raw text is never stored
            text_hash    text NOT NULL,                -- sha256 of the normalized scrubbed text: duplicates
            pii          text[] NOT NULL DEFAULT '{}', -- kinds of PII that were replaced
            submitted_at timestamptz NOT NULL,
            stored_at    timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX texts_hash ON texts (text_hash);

        CREATE TABLE decisions (
            text_id         text PRIMARY KEY,
            prediction      text,
            confidence      double precision NOT NULL,
            abstain         boolean NOT NULL,
            abstain_reason  text,
            prediction_set  jsonb NOT NULL,
            probabilities   jsonb NOT NULL,
            path            text NOT NULL,
            voters          jsonb NOT NULL,            -- voter → top, probabilities, evidence, version
            arbiter_version text NOT NULL,
            decided_at      timestamptz NOT NULL,
            disagreement    double precision NOT NULL,
            harm            double precision NOT NULL,
            priority        double precision NOT NULL, -- disagreement × harm
            reasons         jsonb NOT NULL,            -- why it needs review, [] when it does not
            stored_at       timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX decisions_queue ON decisions (priority DESC) WHERE jsonb_array_length(reasons) > 0;

        CREATE TABLE rule_fires (
            text_id    text NOT NULL,
            rule_id    text NOT NULL,
            rule_label text,                           -- the rule's label when it fired (rules of that time)
            PRIMARY KEY (text_id, rule_id)
        );
        CREATE INDEX rule_fires_rule ON rule_fires (rule_id);

        CREATE TABLE feedback (
            seq          bigserial UNIQUE,             -- arrival order: the trainer's watermark
            feedback_id  text PRIMARY KEY,             -- the idempotency key
            text_id      text NOT NULL,
            label        text,
            thumbs       text CHECK (thumbs IN ('up', 'down')),
            note         text,                         -- PII-scrubbed
            reviewer_id  text NOT NULL,
            created_at   timestamptz NOT NULL,
            received_at  timestamptz NOT NULL DEFAULT now(),
            source       text NOT NULL,
            flagged      boolean NOT NULL DEFAULT false,
            flag_reason  text,
            flag_score   double precision,
            CHECK (label IS NOT NULL OR thumbs IS NOT NULL)
        );
        CREATE INDEX feedback_text ON feedback (text_id);
        CREATE INDEX feedback_reviewer ON feedback (reviewer_id);

        CREATE TABLE hygiene_runs (
            run_id    bigserial PRIMARY KEY,
            ran_at    timestamptz NOT NULL DEFAULT now(),
            method    text NOT NULL,
            n_rows    integer NOT NULL,
            n_flagged integer NOT NULL,
            details   jsonb NOT NULL
        );
"""


def upgrade() -> None:
    # asyncpg prepares each statement: one command per execute
    for statement in STATEMENTS.split(";"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE hygiene_runs, feedback, rule_fires, decisions, texts")
