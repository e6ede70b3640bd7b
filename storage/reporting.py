"""Read-only queries behind `fedmask report` and `fedmask dashboard`: a task's whole history in a few
grouped reads, and an engine that cannot write.

Everything here reads; nothing here takes a write lock, so a report or a dashboard can run beside a live
aggregator. Each function takes an open connection (one snapshot per call, from ``read_transaction``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, event, func, select
from sqlalchemy.engine import URL

from fedmask.storage.engine import make_engine, normalize_url
from fedmask.storage.queries import task_pk
from fedmask.storage.schema import (
    Aggregate,
    Device,
    Fleet,
    PersonalizedModel,
    Rejection,
    Round,
    Task,
    Update,
)


@dataclass(frozen=True)
class TaskRow:
    task_id: str
    fleet: str
    strategy: str
    arch: str
    created_at: dt.datetime
    rounds: int  # rounds opened so far
    open_round: int | None  # the newest open round, if any


@dataclass(frozen=True)
class RoundRow:
    round_no: int
    state: str
    quorum: int
    opened_at: dt.datetime
    deadline: dt.datetime
    closed_at: dt.datetime | None
    closed_by: str | None
    aggregate_bytes: int | None  # the global state the round closed with (what the next round announces)


@dataclass(frozen=True)
class UpdateRow:
    round_no: int
    device_id: str
    staleness: int
    num_samples: int
    payload_bytes: int
    metrics: dict[str, Any]
    received_at: dt.datetime


@dataclass(frozen=True)
class RejectionCount:
    round_no: int | None
    reason: str
    count: int


@dataclass(frozen=True)
class ModelRow:
    device_id: str
    accuracy: float
    latency_ms: float
    size_bytes: int
    peak_rss_bytes: int
    metrics: dict[str, Any]
    created_at: dt.datetime


@dataclass(frozen=True)
class TaskHistory:
    """Everything stored about one task, as plain rows."""

    task: TaskRow
    rounds: list[RoundRow]
    updates: list[UpdateRow]  # oldest first
    rejections: list[RejectionCount]
    models: list[ModelRow]  # one per device: its newest model
    fleet_devices: list[str] = field(default_factory=list)


def read_only_engine(url: str | URL) -> Engine:
    """An engine whose connections refuse to write: SQLite ``query_only``, PostgreSQL read-only sessions."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "postgresql":
        return make_engine(parsed, connect_args={"options": "-c default_transaction_read_only=on"})
    engine = make_engine(parsed)

    @event.listens_for(engine, "connect")
    def _query_only(dbapi_connection: Any, _record: Any) -> None:
        # Registered after make_engine's own hook, so the WAL check (a read once in WAL) runs first.
        dbapi_connection.execute("PRAGMA query_only=ON")

    return engine


def list_tasks(connection: Connection, only_pk: int | None = None) -> list[TaskRow]:
    """Every task (or the one with row id ``only_pk``), newest first, with how many rounds it opened
    and its open round."""
    per_task = (
        select(
            Round.task_pk,
            func.count().label("rounds"),
            func.max(Round.round_no).filter(Round.state == "open").label("open_round"),
        )
        .group_by(Round.task_pk)
        .subquery()
    )
    query = (
        select(
            Task.task_id,
            Fleet.name,
            Task.strategy,
            Task.arch,
            Task.created_at,
            func.coalesce(per_task.c.rounds, 0),
            per_task.c.open_round,
        )
        .join(Fleet, Fleet.id == Task.fleet_pk)
        .outerjoin(per_task, per_task.c.task_pk == Task.id)
        .order_by(Task.created_at.desc(), Task.id.desc())
    )
    if only_pk is not None:
        query = query.where(Task.id == only_pk)
    return [TaskRow(*row) for row in connection.execute(query)]


def task_history(connection: Connection, task_id: str) -> TaskHistory:
    """One task's rounds, accepted updates (metadata and metrics, not payloads), rejections by round and
    reason, final models and its fleet's devices. Raises ``StorageError`` for an unknown task."""
    pk = task_pk(connection, task_id)
    (task,) = list_tasks(connection, only_pk=pk)
    rounds = [
        RoundRow(*row)
        for row in connection.execute(
            select(
                Round.round_no,
                Round.state,
                Round.quorum,
                Round.opened_at,
                Round.deadline,
                Round.closed_at,
                Round.closed_by,
                Aggregate.payload_bytes,
            )
            .outerjoin(Aggregate, Aggregate.round_pk == Round.id)
            .where(Round.task_pk == pk)
            .order_by(Round.round_no)
        )
    ]
    updates = [
        UpdateRow(*row)
        for row in connection.execute(
            select(
                Round.round_no,
                Device.device_id,
                Update.staleness,
                Update.num_samples,
                Update.payload_bytes,
                Update.metrics,
                Update.received_at,
            )
            .join(Round, Round.id == Update.round_pk)
            .join(Device, Device.id == Update.device_pk)
            .where(Update.task_pk == pk)
            .order_by(Update.id)
        )
    ]
    rejections = [
        RejectionCount(*row)
        for row in connection.execute(
            select(Rejection.round_no, Rejection.reason, func.count())
            .where(Rejection.task_id == task_id)
            .group_by(Rejection.round_no, Rejection.reason)
            .order_by(Rejection.round_no, Rejection.reason)
        )
    ]
    newest: dict[str, ModelRow] = {}
    for row in connection.execute(
        select(
            Device.device_id,
            PersonalizedModel.accuracy,
            PersonalizedModel.latency_ms,
            PersonalizedModel.size_bytes,
            PersonalizedModel.peak_rss_bytes,
            PersonalizedModel.metrics,
            PersonalizedModel.created_at,
        )
        .join(Device, Device.id == PersonalizedModel.device_pk)
        .where(PersonalizedModel.task_pk == pk)
        .order_by(PersonalizedModel.created_at, PersonalizedModel.id)
    ):
        newest[row.device_id] = ModelRow(*row)  # later rows win: a device's newest model
    fleet_devices = list(
        connection.scalars(
            select(Device.device_id)
            .join(Fleet, Fleet.id == Device.fleet_pk)
            .where(Fleet.name == task.fleet)
            .order_by(Device.device_id)
        )
    )
    return TaskHistory(
        task=task,
        rounds=rounds,
        updates=updates,
        rejections=rejections,
        models=sorted(newest.values(), key=lambda m: m.device_id),
        fleet_devices=fleet_devices,
    )
