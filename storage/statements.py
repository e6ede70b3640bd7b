"""SQL that differs between the engines, and the statements every update runs, built once per dialect.

Building a SQLAlchemy statement costs more Python time than a local database round trip; the hot path
therefore reuses prebuilt statements and only binds values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy import Connection, Select, Update, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from fedmask.storage.schema import Blob, Device, Round
from fedmask.storage.schema import Update as UpdateRow


@dataclass(frozen=True)
class HotStatements:
    # Parameters: task_pk, round_no. Row: id, state. Share-locks the round on PostgreSQL: updates proceed
    # together, close_round waits for them.
    round_state: Select
    # Parameters: the Blob columns. Inserts once per SHA-256; restores the bytes of a pruned blob.
    put_blob: Insert
    # Parameters: the Update columns, one set per row (executemany). Returns the device_pk of each new
    # row; none for a row whose (round, device) or (task, device, base round) already exists.
    insert_updates: Insert
    # Parameters: device_pk, now. Moves last_seen_at forward only.
    touch_device: Update


def dialect_insert(dialect_name: str, model: type) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that supports ``on_conflict_do_nothing/do_update`` on the given engine."""
    return postgresql.insert(model) if dialect_name == "postgresql" else sqlite.insert(model)


def insert_for(connection: Connection, model: type) -> postgresql.Insert | sqlite.Insert:
    return dialect_insert(connection.dialect.name, model)


@functools.cache
def hot_statements(dialect_name: str) -> HotStatements:
    blob = dialect_insert(dialect_name, Blob)
    return HotStatements(
        round_state=select(Round.id, Round.state)
        .where(Round.task_pk == bindparam("task_pk"), Round.round_no == bindparam("round_no"))
        .with_for_update(read=True, of=Round),
        put_blob=blob.on_conflict_do_update(
            index_elements=[Blob.sha256], set_={"data": blob.excluded.data}, where=Blob.data.is_(None)
        ),
        insert_updates=dialect_insert(dialect_name, UpdateRow)
        .on_conflict_do_nothing()
        .returning(UpdateRow.device_pk),
        touch_device=update(Device)
        .where(Device.id == bindparam("device_pk"), Device.last_seen_at < bindparam("now"))
        .values(last_seen_at=bindparam("now")),
    )
