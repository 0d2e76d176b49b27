"""The trainer's runs and drift alarms in PostgreSQL (asyncpg), one schema; the queue is the runs table."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

FINAL = ("published", "rejected", "failed", "cancelled")
INTERRUPTED = "interrupted: the trainer stopped"
COLUMNS = (
    "run_id, kind, trigger, reason, status, progress, requested_at, started_at, finished_at, champion_version, "
    "candidate_version, published_version, feedback_watermark, data, gate, metrics, durations, error, rollout"
)
JSON_FIELDS = {"data", "gate", "metrics", "durations", "rollout"}
UPDATABLE = set(COLUMNS.split(", ")) - {"run_id", "kind", "trigger", "reason", "requested_at"}


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class QueueFull(RuntimeError):
    """As many runs as allowed are queued already."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} training runs are queued already (limit {limit}); retry once one has started")
        self.queued = queued
        self.limit = limit


def _row(record: asyncpg.Record | None) -> dict[str, Any] | None:
    if record is None:
        return None
    row = dict(record)
    for key in ("requested_at", "started_at", "finished_at"):
        if row.get(key) is not None:
            row[key] = row[key].isoformat()
    return row


class TrainerStore:
    """Runs: queued → running → gated → published | rejected; or failed, or cancelled. Drift alarms."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, schema: str, size: int = 4) -> TrainerStore:
        """A pool whose connections resolve names in `schema`."""
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=size, init=_init, server_settings={"search_path": schema}, command_timeout=60
        )
        return cls(pool)

    async def close(self) -> None:
        """Close the pool."""
        await self.pool.close()

    async def add_run(
        self, run_id: str, kind: str, trigger: str, reason: str | None, *, limit: int | None = None, reuse: bool = False
    ) -> dict[str, Any]:
        """Queue a run, unless `limit` runs are queued already (`QueueFull`); with `reuse`, a run of this kind
        that is queued already is returned instead (its `run_id` is not the one asked for). Atomic: trainers
        sharing the database neither overfill the queue nor queue the same automatic run twice."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('flockwatch.trainer.queue'))")
            if reuse:
                queued = await conn.fetchrow(
                    f"SELECT {COLUMNS} FROM training_runs WHERE status = 'queued' AND kind = $1 ORDER BY seq LIMIT 1",
                    kind,
                )
                if queued is not None:
                    return _row(queued) or {}
            if limit is not None:
                n = int(await conn.fetchval("SELECT count(*) FROM training_runs WHERE status = 'queued'"))
                if n >= limit:
                    raise QueueFull(n, limit)
            record = await conn.fetchrow(
                f"INSERT INTO training_runs (run_id, kind, trigger, reason, status) VALUES ($1, $2, $3, $4, 'queued') "
                f"RETURNING {COLUMNS}",
                run_id,
                kind,
                trigger,
                reason,
            )
        row = _row(record)
        assert row is not None
        return row

    async def run(self, run_id: str) -> dict[str, Any] | None:
        """One run."""
        return _row(await self.pool.fetchrow(f"SELECT {COLUMNS} FROM training_runs WHERE run_id = $1", run_id))

    async def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest runs first."""
        records = await self.pool.fetch(f"SELECT {COLUMNS} FROM training_runs ORDER BY seq DESC LIMIT $1", limit)
        return [r for r in map(_row, records) if r is not None]

    async def update(self, run_id: str, **fields: Any) -> None:
        """Set some columns of a run."""
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        names = list(fields)
        sets = ", ".join(
            f"{n} = ${i}" + ("::timestamptz" if n.endswith("_at") else "") for i, n in enumerate(names, start=2)
        )
        await self.pool.execute(f"UPDATE training_runs SET {sets} WHERE run_id = $1", run_id, *fields.values())

    async def claim_next(self) -> dict[str, Any] | None:
        """The oldest queued run, now running — unless a run is running already (one at a time)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('flockwatch.trainer.queue'))")
            if await conn.fetchval("SELECT 1 FROM training_runs WHERE status IN ('running', 'gated')"):
                return None
            return _row(
                await conn.fetchrow(
                    f"""UPDATE training_runs SET status = 'running', started_at = now(), progress = 'starting'
                        WHERE run_id = (SELECT run_id FROM training_runs WHERE status = 'queued' ORDER BY seq LIMIT 1)
                        RETURNING {COLUMNS}"""
                )
            )

    async def cancel_queued(self, run_id: str) -> bool:
        """Cancel a run that has not started; False if it is not queued."""
        result = await self.pool.execute(
            "UPDATE training_runs SET status = 'cancelled', finished_at = now(), progress = 'cancelled before start' "
            "WHERE run_id = $1 AND status = 'queued'",
            run_id,
        )
        return bool(result.endswith(" 1"))

    async def interrupt_running(self) -> list[dict[str, Any]]:
        """Runs left running by a stopped trainer: failed (their process died with it); their records."""
        records = await self.pool.fetch(
            "UPDATE training_runs SET status = 'failed', finished_at = now(), "
            f"error = '{INTERRUPTED}' WHERE status IN ('running', 'gated') RETURNING {COLUMNS}"
        )
        return [r for r in map(_row, records) if r is not None]

    async def active(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Queued and running runs (of one kind)."""
        records = await self.pool.fetch(
            f"SELECT {COLUMNS} FROM training_runs WHERE status IN ('queued', 'running', 'gated') "
            "AND ($1::text IS NULL OR kind = $1) "
            "ORDER BY seq",
            kind,
        )
        return [r for r in map(_row, records) if r is not None]

    async def watermark(self) -> int:
        """The newest feedback seq a *completed* run (published, rejected, or gated and in shadow) has taken in
        (0: none yet): corrections after it are new. A failed, cancelled or interrupted run consumed nothing."""
        value = await self.pool.fetchval(
            "SELECT max(feedback_watermark) FROM training_runs WHERE status IN ('published', 'rejected', 'shadow')"
        )
        return int(value or 0)

    async def last_drift_run(self) -> dict[str, Any] | None:
        """The newest run a drift alarm queued."""
        return _row(
            await self.pool.fetchrow(
                f"SELECT {COLUMNS} FROM training_runs WHERE trigger = 'drift' ORDER BY seq DESC LIMIT 1"
            )
        )

    async def add_drift(self, state: dict[str, Any], action: str, run_id: str | None) -> int:
        """Record a drift alarm and what it set off."""
        return int(
            await self.pool.fetchval(
                "INSERT INTO drift_events (model_version, n_reference, n_live, martingale, ks, action, run_id) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING event_id",
                state["version"],
                state["n_reference"],
                state["n_live"],
                state["max_martingale"],  # the peak that raised the alarm (it may fall again within its batch)
                state.get("ks") or {},
                action,
                run_id,
            )
        )

    async def drift_events(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest drift alarms first."""
        records = await self.pool.fetch("SELECT * FROM drift_events ORDER BY event_id DESC LIMIT $1", limit)
        return [{**dict(r), "at": r["at"].isoformat()} for r in records]

    # --- rollout: shadow decisions and the runs that wait on them ----------------------------------------------

    async def with_status(self, status: str) -> list[dict[str, Any]]:
        """Runs in one status, oldest first."""
        records = await self.pool.fetch(f"SELECT {COLUMNS} FROM training_runs WHERE status = $1 ORDER BY seq", status)
        return [r for r in map(_row, records) if r is not None]

    async def last_published(self) -> dict[str, Any] | None:
        """The newest published run."""
        return _row(
            await self.pool.fetchrow(
                f"SELECT {COLUMNS} FROM training_runs WHERE status = 'published' ORDER BY seq DESC LIMIT 1"
            )
        )

    async def shadow_seen(self, run_id: str) -> list[str]:
        """The texts a run in shadow has decided already."""
        return [r[0] for r in await self.pool.fetch("SELECT text_id FROM shadow_decisions WHERE run_id = $1", run_id)]

    async def add_shadow(self, run_id: str, rows: list[tuple[str, str, str | None, str | None, float]]) -> None:
        """Record shadow decisions: (text_id, champion version, champion's answer, challenger's, its confidence)."""
        await self.pool.executemany(
            "INSERT INTO shadow_decisions (run_id, text_id, champion_version, champion_prediction, "
            "challenger_prediction, challenger_confidence) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            [(run_id, *row) for row in rows],
        )

    async def shadow_decisions(self, run_id: str) -> list[dict[str, Any]]:
        """A run's shadow decisions, in the order they were scored."""
        records = await self.pool.fetch(
            "SELECT text_id, champion_version, champion_prediction, challenger_prediction, challenger_confidence "
            "FROM shadow_decisions WHERE run_id = $1 ORDER BY scored_at, text_id",
            run_id,
        )
        return [dict(r) for r in records]
