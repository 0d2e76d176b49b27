"""PostgreSQL through asyncpg: batched idempotent inserts (one `unnest` statement per table) and the reads."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a lost or restarting database raises: worth waiting for, unlike a bad row.
TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)

TextRow = tuple[str, str, str, str, datetime]  # text_id, scrubbed text, hash, pii kinds (comma-joined), submitted
DecisionRow = tuple[Any, ...]
FireRow = tuple[str, str, str | None]  # text_id, rule_id, rule label
FeedbackRow = tuple[str, str, str | None, str | None, str | None, str, datetime, str]

INSERT_TEXTS = """
INSERT INTO texts (text_id, text, text_hash, pii, submitted_at)
SELECT x.text_id, x.text, x.text_hash, string_to_array(x.pii, ','), x.submitted_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
     AS x(text_id, text, text_hash, pii, submitted_at)
ON CONFLICT (text_id) DO NOTHING
"""
INSERT_DECISIONS = """
INSERT INTO decisions (text_id, prediction, confidence, abstain, abstain_reason, prediction_set, probabilities, path,
                       voters, arbiter_version, decided_at, disagreement, harm, priority, reasons)
SELECT x.a, x.b, x.c, x.d, x.e, x.f::jsonb, x.g::jsonb, x.h, x.i::jsonb, x.j, x.k, x.l, x.m, x.n, x.o::jsonb
FROM unnest($1::text[], $2::text[], $3::float8[], $4::bool[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::text[], $11::timestamptz[], $12::float8[], $13::float8[], $14::float8[], $15::text[])
     AS x(a, b, c, d, e, f, g, h, i, j, k, l, m, n, o)
ON CONFLICT (text_id) DO NOTHING
"""
INSERT_FIRES = """
INSERT INTO rule_fires (text_id, rule_id, rule_label)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT DO NOTHING
"""
INSERT_FEEDBACK = """
INSERT INTO feedback (feedback_id, text_id, label, thumbs, note, reviewer_id, created_at, source)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[],
                     $8::text[])
ON CONFLICT (feedback_id) DO NOTHING
RETURNING feedback_id
"""
FEEDBACK_COLUMNS = (
    "feedback_id, seq, text_id, label, thumbs, note, reviewer_id, created_at, received_at, source, "
    "flagged, flag_reason, flag_score"
)
CORRECTIONS = f"""
SELECT {", ".join("f." + c for c in FEEDBACK_COLUMNS.split(", "))}, t.text, t.text_hash, d.prediction
FROM feedback f LEFT JOIN texts t USING (text_id) LEFT JOIN decisions d USING (text_id)
ORDER BY f.seq
"""


# texts the model was unsure of and nobody has given feedback on (nor on a duplicate of them)
def _latest_labels(condition: str = "") -> str:
    """The newest unflagged correction (text_id, label) of each text with one (and meeting `condition`)."""
    where = f" AND {condition}" if condition else ""
    return (
        "SELECT DISTINCT ON (text_id) text_id, label FROM feedback "
        f"WHERE label IS NOT NULL AND NOT flagged{where} ORDER BY text_id, seq DESC"
    )


MODEL_QUEUE = """
FROM decisions d LEFT JOIN texts t USING (text_id)
WHERE jsonb_array_length(d.reasons) > 0
  AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.text_id = d.text_id)
  AND NOT EXISTS (SELECT 1 FROM feedback f JOIN texts t2 USING (text_id) WHERE t2.text_hash = t.text_hash)
"""
QUEUE_COLUMNS = """d.text_id, t.text, t.text_hash, d.prediction, d.confidence, d.abstain, d.abstain_reason,
    d.prediction_set, d.voters, d.disagreement, d.harm, d.priority, d.reasons, d.decided_at"""


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class FeedbackStore:
    """The service's tables in one schema; bus writes retry through a lost database for `retry_s`."""

    def __init__(self, pool: asyncpg.Pool, retry_s: float = 60.0) -> None:
        self.pool = pool
        self.retry_s = retry_s

    @classmethod
    async def connect(cls, dsn: str, schema: str, size: int = 8, retry_s: float = 60.0) -> FeedbackStore:
        """A pool whose connections resolve names in `schema`."""
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=size, init=_init, server_settings={"search_path": schema}, command_timeout=60
        )
        return cls(pool, retry_s)

    async def close(self) -> None:
        """Close the pool."""
        await self.pool.close()

    async def retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run `op`, retrying with back-off while the database is unreachable (at most `retry_s`)."""
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(self.retry_s),
            wait=wait_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception_type(TRANSIENT),
            reraise=True,
        ):
            with attempt:
                return await op()
        raise AssertionError("unreachable")  # pragma: no cover - AsyncRetrying either returns or raises

    async def insert_texts(self, rows: Sequence[TextRow]) -> None:
        """Store scrubbed texts; repeats are ignored."""
        if rows:
            await self.pool.execute(INSERT_TEXTS, *_columns(rows, 5))

    async def insert_decisions(self, rows: Sequence[DecisionRow], fires: Sequence[FireRow]) -> None:
        """Store decisions and the rules that fired for them, in one transaction; repeats are ignored."""
        if not rows:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT_DECISIONS, *_columns(rows, 15))
            if fires:
                await conn.execute(INSERT_FIRES, *_columns(fires, 3))

    async def insert_feedback(self, rows: Sequence[FeedbackRow]) -> set[str]:
        """Store feedback; returns the ids that were new (the rest were already stored)."""
        if not rows:
            return set()
        records = await self.pool.fetch(INSERT_FEEDBACK, *_columns(rows, 8))
        return {r["feedback_id"] for r in records}

    async def feedback(self, feedback_id: str) -> dict[str, Any] | None:
        """One stored feedback row."""
        row = await self.pool.fetchrow(f"SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE feedback_id = $1", feedback_id)
        return dict(row) if row else None

    async def corrections(self) -> list[asyncpg.Record]:
        """Every feedback row with its text (scrubbed), text hash and the decision's prediction."""
        return list(await self.pool.fetch(CORRECTIONS))

    async def model_queue(self, limit: int) -> list[asyncpg.Record]:
        """The decisions most in need of review (highest priority first) that nobody has reviewed."""
        sql = f"SELECT {QUEUE_COLUMNS} {MODEL_QUEUE} ORDER BY d.priority DESC, d.decided_at LIMIT $1"
        return list(await self.pool.fetch(sql, limit))

    async def model_queue_size(self) -> int:
        """How many decisions wait for a first review."""
        return int(await self.pool.fetchval(f"SELECT count(*) {MODEL_QUEUE}"))

    async def decisions_of(self, text_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
        """Queue columns for the given texts (those that have a decision or a text)."""
        sql = f"""SELECT {QUEUE_COLUMNS.replace("d.text_id", "COALESCE(d.text_id, t.text_id) AS text_id")}
                  FROM texts t FULL JOIN decisions d USING (text_id)
                  WHERE COALESCE(d.text_id, t.text_id) = ANY($1::text[])"""
        return {r["text_id"]: r for r in await self.pool.fetch(sql, list(text_ids))}

    async def probabilities_of(self, text_ids: Sequence[str]) -> dict[str, dict[str, float]]:
        """The ensemble's class probabilities for the given texts (those it decided)."""
        sql = "SELECT text_id, probabilities FROM decisions WHERE text_id = ANY($1::text[])"
        rows = await self.pool.fetch(sql, list(set(text_ids)))  # jsonb comes back decoded (see `_init`)
        return {r["text_id"]: {str(k): float(v) for k, v in r["probabilities"].items()} for r in rows}

    async def set_flags(self, flags: Sequence[tuple[str, str, float]], method: str, rows: int, details: Any) -> int:
        """Flag corrections as likely label errors (id, reason, score) and record the run; returns its id."""
        async with self.pool.acquire() as conn, conn.transaction():
            if flags:
                await conn.execute(
                    """UPDATE feedback SET flagged = true, flag_reason = x.reason, flag_score = x.score
                       FROM unnest($1::text[], $2::text[], $3::float8[]) AS x(id, reason, score)
                       WHERE feedback.feedback_id = x.id""",
                    *_columns(flags, 3),
                )
            return int(
                await conn.fetchval(
                    "INSERT INTO hygiene_runs (method, n_rows, n_flagged, details) VALUES ($1, $2, $3, $4) "
                    "RETURNING run_id",
                    method,
                    rows,
                    len(flags),
                    details,
                )
            )

    async def last_hygiene_run(self) -> dict[str, Any] | None:
        """The newest label-hygiene run."""
        row = await self.pool.fetchrow("SELECT * FROM hygiene_runs ORDER BY run_id DESC LIMIT 1")
        return dict(row) if row else None

    async def rule_fire_counts(self) -> dict[str, int]:
        """Texts each rule fired on."""
        return {
            r["rule_id"]: r["n"]
            for r in await self.pool.fetch("SELECT rule_id, count(*) AS n FROM rule_fires GROUP BY rule_id")
        }

    async def rule_fires_on(self, text_ids: Sequence[str]) -> list[tuple[str, str]]:
        """(text id, rule id) for every rule that fired on the given texts."""
        rows = await self.pool.fetch(
            "SELECT text_id, rule_id FROM rule_fires WHERE text_id = ANY($1::text[])", list(text_ids)
        )
        return [(r["text_id"], r["rule_id"]) for r in rows]

    async def rule_conflicts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per rule: texts where a rule claiming another label also fired; texts the ensemble decided otherwise."""
        with_rules = await self.pool.fetch(
            """SELECT a.rule_id, count(DISTINCT a.text_id) AS n FROM rule_fires a
               JOIN rule_fires b ON a.text_id = b.text_id AND a.rule_id <> b.rule_id
               WHERE a.rule_label IS NOT NULL AND b.rule_label IS NOT NULL AND a.rule_label <> b.rule_label
               GROUP BY a.rule_id"""
        )
        with_decision = await self.pool.fetch(
            """SELECT r.rule_id, count(*) AS n FROM rule_fires r JOIN decisions d USING (text_id)
               WHERE r.rule_label IS NOT NULL AND d.prediction IS NOT NULL AND d.prediction <> r.rule_label
               GROUP BY r.rule_id"""
        )
        return {r["rule_id"]: r["n"] for r in with_rules}, {r["rule_id"]: r["n"] for r in with_decision}

    async def repeated_feedback(self, limit: int) -> list[dict[str, Any]]:
        """The same reviewer giving the same feedback on the same text more than once (under different ids)."""
        rows = await self.pool.fetch(
            """SELECT text_id, reviewer_id, label, thumbs, count(*) AS n, array_agg(feedback_id ORDER BY seq) AS ids
               FROM feedback GROUP BY text_id, reviewer_id, label, thumbs HAVING count(*) > 1
               ORDER BY n DESC, text_id LIMIT $1""",
            limit,
        )
        return [dict(r) for r in rows]

    async def duplicate_texts(self, limit: int) -> list[dict[str, Any]]:
        """Texts stored under several ids (the same normalized scrubbed text)."""
        rows = await self.pool.fetch(
            """SELECT text_hash, min(text) AS text, count(*) AS n, array_agg(text_id ORDER BY text_id) AS text_ids,
                      count(*) FILTER (WHERE EXISTS (SELECT 1 FROM feedback f WHERE f.text_id = t.text_id))
                        AS with_feedback
               FROM texts t GROUP BY text_hash HAVING count(*) > 1 ORDER BY n DESC, text_hash LIMIT $1""",
            limit,
        )
        return [dict(r) for r in rows]

    async def count_feedback_since(self, seq: int) -> int:
        """Corrections (labels) stored after `seq`."""
        return int(await self.pool.fetchval("SELECT count(*) FROM feedback WHERE seq > $1 AND label IS NOT NULL", seq))

    # --- live traffic, for the trainer's safe rollout (services/trainer/rollout.py) --------------------------

    async def live_decisions(
        self, since: datetime, arbiter_version: str, exclude: Sequence[str], limit: int
    ) -> list[asyncpg.Record]:
        """Texts decided by `arbiter_version` since `since` (oldest first, `exclude`d ids left out): text_id, the
        scrubbed text, and the served answer (NULL when it abstained)."""
        return list(
            await self.pool.fetch(
                """SELECT d.text_id, t.text, CASE WHEN d.abstain THEN NULL ELSE d.prediction END AS answer
                   FROM decisions d JOIN texts t USING (text_id)
                   WHERE d.decided_at >= $1 AND d.arbiter_version = $2 AND NOT (d.text_id = ANY($3::text[]))
                   ORDER BY d.decided_at, d.text_id LIMIT $4""",
                since,
                arbiter_version,
                list(exclude),
                limit,
            )
        )

    async def latest_labels(self, text_ids: Sequence[str]) -> dict[str, str]:
        """The newest unflagged correction (label) of each text that has one."""
        rows = await self.pool.fetch(_latest_labels("text_id = ANY($1::text[])"), list(text_ids))
        return {r["text_id"]: r["label"] for r in rows}

    async def corrected_answers(self, arbiter_version: str) -> tuple[int, int]:
        """Texts `arbiter_version` answered that have a correction (newest unflagged label), and how many of
        those answers the correction contradicts."""
        row = await self.pool.fetchrow(
            f"""WITH latest AS ({_latest_labels()})
               SELECT count(*) AS n, count(*) FILTER (WHERE d.prediction <> l.label) AS wrong
               FROM decisions d JOIN latest l USING (text_id)
               WHERE d.arbiter_version = $1 AND NOT d.abstain""",
            arbiter_version,
        )
        return int(row["n"]), int(row["wrong"])
