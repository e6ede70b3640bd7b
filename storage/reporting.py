"""Read-only queries behind `fedmask report` and `fedmask dashboard`: a task's whole history in a few
grouped reads, and an engine that cannot write.

Everything here reads; nothing here takes a write lock, so a report or a dashboard can run beside a live
aggregator. Each function takes an open connection (one snapshot per call, from ``read_transaction``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, case, cast, event, func, select
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
    # Over the round's accepted updates, from the metrics they carried (None: no update reported it):
    participants: int
    late: int  # trained from an older round (staleness >= 1)
    uplink_bytes: int
    accuracy: float | None  # test accuracy, weighted by the test samples reported beside it
    loss: float | None  # mean
    density: float | None  # mean


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
    rejections: list[RejectionCount]
    models: list[ModelRow]  # one per device: its newest model
    task_devices: int  # devices that sent this task an update or a model
    num_test: dict[str, int]  # per device: the test samples its newest update reported
    open_round_reported: list[str]  # devices heard from in the newest open round, in arrival order
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
    """One task's rounds with what their accepted updates add up to (counts, bytes, the metrics they
    reported), rejections by round and reason, final models, the open round's reporters and the fleet's
    devices. Raises ``StorageError`` for an unknown task."""
    pk = task_pk(connection, task_id)
    (task,) = list_tasks(connection, only_pk=pk)
    # One grouped pass over the task's updates: the metrics are summed in SQL, not shipped row by row.
    accuracy, tested = Update.metrics["test_accuracy"].as_float(), Update.metrics["num_test"].as_float()
    per_round = (
        select(
            Update.round_pk,
            func.count().label("participants"),
            func.sum(case((Update.staleness > 0, 1), else_=0)).label("late"),
            cast(func.sum(Update.payload_bytes), BigInteger).label("uplink_bytes"),
            func.sum(accuracy * tested).label("correct"),
            func.sum(case((accuracy.is_not(None), tested))).label("tested"),
            func.avg(accuracy).label("accuracy_mean"),
            func.avg(Update.metrics["loss"].as_float()).label("loss"),
            func.avg(Update.metrics["density"].as_float()).label("density"),
        )
        .where(Update.task_pk == pk)
        .group_by(Update.round_pk)
        .subquery()
    )
    rounds = [
        RoundRow(
            *row[:8],
            participants=row.participants or 0,
            late=int(row.late or 0),
            uplink_bytes=int(row.uplink_bytes or 0),
            accuracy=_weighted(row.correct, row.tested, row.accuracy_mean),
            loss=_float(row.loss),
            density=_float(row.density),
        )
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
                *per_round.c[1:],
            )
            .outerjoin(Aggregate, Aggregate.round_pk == Round.id)
            .outerjoin(per_round, per_round.c.round_pk == Round.id)
            .where(Round.task_pk == pk)
            .order_by(Round.round_no)
        )
    ]
    # Each device's newest update in the task: who worked on it, and its test-set size.
    newest_update = select(func.max(Update.id)).where(Update.task_pk == pk).group_by(Update.device_pk)
    last_tested = dict(
        connection.execute(
            select(Device.device_id, tested)
            .join(Update, Update.device_pk == Device.id)
            .where(Update.id.in_(newest_update))
        ).all()
    )
    open_round = max((r.round_no for r in rounds if r.state == "open"), default=None)
    reported = []
    if open_round is not None:
        reported = list(
            connection.scalars(
                select(Device.device_id)
                .join(Update, Update.device_pk == Device.id)
                .join(Round, Round.id == Update.round_pk)
                .where(Round.task_pk == pk, Round.round_no == open_round)
                .order_by(Update.id)
            )
        )
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
        rejections=rejections,
        models=sorted(newest.values(), key=lambda m: m.device_id),
        task_devices=len(set(last_tested) | set(newest)),
        num_test={device: int(n) for device, n in last_tested.items() if n is not None},
        open_round_reported=reported,
        fleet_devices=fleet_devices,
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _weighted(correct: Any, tested: Any, mean: Any) -> float | None:
    """Sample-weighted accuracy; the plain mean when no update reported its test-set size."""
    if tested:
        return float(correct) / float(tested)
    return _float(mean)
