"""Alembic environment: runs the feedback migrations over asyncpg, in the configured schema, one runner at a time."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
URL = config.get_main_option("sqlalchemy.url") or ""
SCHEMA = config.get_main_option("schema") or "feedback"


def run(connection: Connection) -> None:
    """Lock, create the schema, and upgrade inside it (unqualified names resolve to it)."""
    # a session lock: two instances starting together must not both apply a migration
    connection.execute(text("SELECT pg_advisory_lock(hashtext(:key))"), {"key": f"flockwatch.migrate.{SCHEMA}"})
    try:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))
        connection.execute(text(f'SET search_path TO "{SCHEMA}"'))
        connection.commit()
        connection.dialect.default_schema_name = SCHEMA
        context.configure(connection=connection, version_table_schema=SCHEMA, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": f"flockwatch.migrate.{SCHEMA}"})
        connection.commit()


async def run_async() -> None:
    """Open one connection (no pool), run, dispose."""
    engine = create_async_engine(URL, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=URL, literal_binds=True, version_table_schema=SCHEMA)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_async())
