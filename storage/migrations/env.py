"""Alembic environment for the store.

Called by :mod:`fedmask.storage.migrate` with a connection already inside a locked transaction, or by
the ``alembic`` command (``alembic -c storage/alembic.ini -x db=URL ...``; the URL may also come from
FEDMASK_DB) when writing a new revision.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from fedmask.storage.engine import make_engine, write_transaction
from fedmask.storage.schema import Base

config = context.config


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("db") or os.environ.get("FEDMASK_DB")
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database URL: pass -x db=URL or set FEDMASK_DB")
    return url


def _run(connection: Connection) -> None:
    # Batch mode lets future ALTERs work on SQLite (it rebuilds the table); PostgreSQL ALTERs directly.
    # DDL is transactional on both engines here: the caller's transaction wraps every migration.
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
elif (given := config.attributes.get("connection")) is not None:
    _run(given)
else:
    engine = make_engine(_url())
    try:
        with write_transaction(engine) as connection:
            _run(connection)
    finally:
        engine.dispose()
