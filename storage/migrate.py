"""Alembic, driven from Python: the migrations ship inside the package, so this works from the source
tree and from an installed wheel alike (no alembic.ini needed at run time)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from fedmask.storage.engine import write_transaction

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
# Any fixed number; every aggregator process that upgrades the same PostgreSQL database takes this lock.
_PG_MIGRATION_LOCK = 0x66656D61736B  # "femask"
VERSION_TABLE = "alembic_version"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations; ``connection`` is used by env.py if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision the packaged migrations know."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no Alembic revisions found under {MIGRATIONS_DIR}")
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, or None for a database Alembic never touched."""
    # Read Alembic's version table directly: a MigrationContext would log at INFO on every query command.
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.scalar(text(f"SELECT version_num FROM {VERSION_TABLE}"))


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision``; a no-op when already there.

    Runs in one transaction holding the write lock (SQLite) or an advisory lock (PostgreSQL), so several
    processes starting at once migrate the database exactly once.
    """
    with write_transaction(engine, sqlite_foreign_keys=False) as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        before = current_revision(connection)
        command.upgrade(alembic_config(connection), revision)
        after = current_revision(connection)
    if before != after:
        logger.info("database migrated from %s to %s", before or "empty", after)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` ("base" drops every table the store created)."""
    with write_transaction(engine, sqlite_foreign_keys=False) as connection:
        command.downgrade(alembic_config(connection), revision)
