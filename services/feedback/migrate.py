"""Schema migrations (alembic, over asyncpg): `upgrade` at start-up or by `flockwatch feedback migrate`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# alembic announces each of its plugins at INFO; the migrations it runs still show
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def sqlalchemy_url(dsn: str) -> str:
    """The asyncpg DSN as a SQLAlchemy URL (`postgresql+asyncpg://…`)."""
    scheme, rest = dsn.split("://", 1)
    if scheme not in ("postgres", "postgresql", "postgresql+asyncpg"):
        raise ValueError(f"not a PostgreSQL URL: {dsn!r}")
    return f"postgresql+asyncpg://{rest}"


def alembic_config(dsn: str, schema: str) -> Config:
    """An alembic configuration without an ini file."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(dsn).replace("%", "%%"))
    config.set_main_option("schema", schema)
    return config


def upgrade(dsn: str, schema: str, revision: str = "head") -> None:
    """Bring the schema to `revision` (creates the schema; safe to run from several instances at once)."""
    command.upgrade(alembic_config(dsn, schema), revision)


def downgrade(dsn: str, schema: str, revision: str = "base") -> None:
    """Undo migrations down to `revision`."""
    command.downgrade(alembic_config(dsn, schema), revision)


async def upgrade_async(dsn: str, schema: str) -> None:
    """`upgrade` from async code (alembic runs its own event loop, so in a worker thread)."""
    await asyncio.to_thread(upgrade, dsn, schema)
