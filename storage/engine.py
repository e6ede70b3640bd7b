"""Engines for the two supported databases, configured for several writers at once.

SQLite: WAL (readers never block the writer), foreign keys on, a busy timeout, and write transactions
opened with ``BEGIN IMMEDIATE``. The last one matters: a deferred transaction that reads and then writes
fails at once with "database is locked" when another connection committed in between, and no busy
timeout can help it; taking the write lock up front makes concurrent writers queue instead.

PostgreSQL: psycopg 3 (``postgresql+psycopg://``); a bare ``postgresql://`` URL is given that driver.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from fedmask.storage.errors import StorageError

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
# Execution option a connection carries when it is about to write.
_WRITE_OPTION = "fedmask_write"


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL, choosing psycopg 3 for PostgreSQL; a clear error for anything else."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StorageError(f"database URL {url!r} is not a valid SQLAlchemy URL ({exc})") from exc
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(
            f"database URL {parsed.render_as_string(hide_password=True)}: unsupported backend {backend!r}; "
            "expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        )
    return parsed


def make_engine(url: str | URL, *, sqlite_synchronous: str = "FULL", **kwargs: Any) -> Engine:
    """Create an engine for ``url`` with the per-engine settings described in the module docstring.

    ``sqlite_synchronous``: FULL (default) makes a commit survive power loss, which is what
    "acknowledged only once stored" needs on a device-class machine; NORMAL survives a process crash only.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True, **kwargs)
    if parsed.database in (None, "", ":memory:"):
        raise StorageError("an in-memory SQLite database cannot be shared by the store; give a file path")
    synchronous = sqlite_synchronous.upper()
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise StorageError(f"sqlite_synchronous={sqlite_synchronous!r}; expected one of {SQLITE_SYNCHRONOUS}")
    engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module; `_begin` below emits BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _enable_wal(cursor: Any) -> None:
    """Switch a database to WAL, waiting out other connections doing the same.

    Changing the journal mode needs an exclusive lock, and SQLite reports "database is locked" at once
    (without its busy handler) when several processes open a new database together; seen in CI with
    three stores upgrading one fresh file. Once a database is in WAL mode this is a read.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextlib.contextmanager
def write_transaction(engine: Engine, *, sqlite_foreign_keys: bool = True) -> Iterator[Connection]:
    """A connection in a transaction that commits on success and rolls back on error.

    On SQLite it holds the write lock from the start (see the module docstring).
    ``sqlite_foreign_keys=False`` is for migrations: SQLite alters a table by rebuilding it, and with
    foreign keys enforced, dropping the old copy fails. This follows SQLite's documented procedure:
    keys off outside the transaction, change, ``PRAGMA foreign_key_check`` before committing, keys on.
    """
    with engine.connect() as connection:
        relax = not sqlite_foreign_keys and connection.dialect.name == "sqlite"
        if relax:
            _sqlite_pragma(connection, "foreign_keys=OFF")
        try:
            connection = connection.execution_options(**{_WRITE_OPTION: True})
            with connection.begin():
                yield connection
                if relax and (broken := connection.exec_driver_sql("PRAGMA foreign_key_check").all()):
                    raise StorageError(
                        f"foreign keys broken by the migration (table, rowid, parent): {broken[:5]}"
                    )
        finally:
            if relax:
                _sqlite_pragma(connection, "foreign_keys=ON")


def _sqlite_pragma(connection: Connection, pragma: str) -> None:
    # Straight to the driver: through SQLAlchemy the statement would open a transaction, and these
    # pragmas are no-ops inside one.
    connection.connection.driver_connection.execute(f"PRAGMA {pragma}")


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a read transaction: one consistent snapshot, no write lock."""
    with engine.connect() as connection, connection.begin():
        yield connection
