"""SQL that differs between the engines, and the statements every update runs, built once per dialect.

Building a SQLAlchemy statement costs more Python time than a local database round trip; the hot path
therefore reuses prebuilt statements and only binds values.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Double,
    Integer,
    Select,
    Text,
    Update,
    bindparam,
    cast,
    func,
    select,
    update,
)
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
    # Parameters: see ``insert_updates``. Returns the device_pk of each new row; none for a row whose
    # (round, device) or (task, device, base round) already exists.
    insert_updates: Insert
    # Parameters: device_pks (a list), now. Moves last_seen_at forward only. One statement per batch:
    # as an executemany it bound ``now`` twice per row, and its datetime processing showed in profiles.
    touch_devices: Update


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
        insert_updates=(
            _insert_unnested() if dialect_name == "postgresql" else dialect_insert(dialect_name, UpdateRow)
        )
        .on_conflict_do_nothing()
        .returning(UpdateRow.device_pk),
        touch_devices=update(Device)
        .where(Device.id.in_(bindparam("device_pks", expanding=True)), Device.last_seen_at < bindparam("now"))
        .values(last_seen_at=bindparam("now")),
    )


# Per-row columns of a batch of updates; the rest (task, round, time received) are the batch's.
_ROW_COLUMNS = {
    "device_pk": BigInteger,
    "base_round": Integer,
    "staleness": Integer,
    "weight": Double,
    "num_samples": Integer,
    "payload_sha256": Text,
    "payload_bytes": BigInteger,
    "metrics": Text,  # JSON text, cast to JSONB in the statement
}
_BATCH_COLUMNS = ("task_pk", "round_pk", "received_at")


def _insert_unnested() -> postgresql.Insert:
    """PostgreSQL: the batch as one array per column, unnested by the server. A multi-row VALUES list
    has one parameter per value, and psycopg parses such a statement again at every call (it caches
    statements of at most 50 parameters): 0.19 ms of CPU per update in batches of 256."""
    columns = [
        cast(func.unnest(bindparam(name, type_=postgresql.ARRAY(kind))), postgresql.JSONB)
        if name == "metrics"
        else func.unnest(bindparam(name, type_=postgresql.ARRAY(kind)))
        for name, kind in _ROW_COLUMNS.items()
    ]
    batch = [bindparam(name, type_=UpdateRow.__table__.c[name].type) for name in _BATCH_COLUMNS]
    return postgresql.insert(UpdateRow).from_select(
        [*_ROW_COLUMNS, *_BATCH_COLUMNS], select(*columns, *batch)
    )


def insert_updates(
    connection: Connection, task_pk: int, round_pk: int, received_at: dt.datetime, rows: list[dict[str, Any]]
) -> set[int]:
    """Insert a batch's updates of one round (``rows``: the per-row columns); the device_pks of the rows
    inserted (see ``HotStatements.insert_updates``)."""
    dialect = connection.dialect.name
    statement = hot_statements(dialect).insert_updates
    batch = {"task_pk": task_pk, "round_pk": round_pk, "received_at": received_at}
    if dialect != "postgresql":
        return set(connection.scalars(statement, [{**row, **batch} for row in rows]))
    arrays: dict[str, Any] = {name: [row[name] for row in rows] for name in _ROW_COLUMNS}
    arrays["metrics"] = [json.dumps(metrics) for metrics in arrays["metrics"]]
    return set(connection.scalars(statement, {**arrays, **batch}))
