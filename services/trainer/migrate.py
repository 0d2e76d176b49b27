"""The trainer's schema migrations: its own revisions (`migrations/versions`) run by the feedback service's
alembic environment (asyncpg, the schema from the config, an advisory lock against concurrent upgrades)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from flockwatch.feedback.migrate import alembic_config

VERSIONS = Path(__file__).resolve().parent / "migrations" / "versions"


def upgrade(dsn: str, schema: str, revision: str = "head") -> None:
    """Bring the trainer's schema to `revision` (creates the schema)."""
    config = alembic_config(dsn, schema)
    config.set_main_option("version_locations", str(VERSIONS))
    command.upgrade(config, revision)


def downgrade(dsn: str, schema: str, revision: str = "base") -> None:
    """Undo the trainer's migrations down to `revision`."""
    config = alembic_config(dsn, schema)
    config.set_main_option("version_locations", str(VERSIONS))
    command.downgrade(config, revision)


async def upgrade_async(dsn: str, schema: str) -> None:
    """`upgrade` from async code (alembic runs its own event loop, so in a worker thread)."""
    await asyncio.to_thread(upgrade, dsn, schema)
