"""Read-side queries, each a function of an open connection (the Store supplies the transaction).

Counts come from the indexed foreign keys and are restricted to the fleet or task asked about, so a
query on one task touches only that task's rows, however much else the store holds.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Connection, Select, and_, cast, func, select

from fedmask.storage.blobs import read_blob
from fedmask.storage.errors import StorageError
from fedmask.storage.records import (
    MODEL_ORDERS,
    AggregateInfo,
    DeviceInfo,
    ExportFormat,
    ModelInfo,
    ModelOrder,
    RejectionInfo,
    RoundDetail,
    RoundInfo,
    RoundSummary,
    TaskStatus,
    UpdateSummary,
)
from fedmask.storage.schema import (
    Aggregate,
    Blob,
    Device,
    Fleet,
    PersonalizedModel,
    Rejection,
    Round,
    Task,
    Update,
)

# Which stored file each export format is.
EXPORT_COLUMNS = {
    "tflite": PersonalizedModel.tflite_sha256,
    "torch": PersonalizedModel.weights_sha256,
    "mask": PersonalizedModel.mask_sha256,
}


def fleet_pk(connection: Connection, fleet: str) -> int:
    pk = connection.scalar(select(Fleet.id).where(Fleet.name == fleet))
    if pk is None:
        known = connection.scalars(select(Fleet.name).order_by(Fleet.name)).all()
        raise StorageError(f"unknown fleet {fleet!r}; the store knows {_listing(known)}")
    return pk


def task_pk(connection: Connection, task_id: str) -> int:
    pk = connection.scalar(select(Task.id).where(Task.task_id == task_id))
    if pk is None:
        known = connection.scalars(select(Task.task_id).order_by(Task.task_id)).all()
        raise StorageError(f"unknown task {task_id!r}; the store knows {_listing(known)}")
    return pk


def round_infos(
    connection: Connection, task_pk: int, task_id: str, condition: ColumnElement[bool]
) -> list[RoundInfo]:
    """Rounds of one task matching ``condition``, oldest first, with their participants."""
    rounds = connection.execute(
        select(
            Round.id,
            Round.round_no,
            Round.state,
            Round.quorum,
            Round.deadline,
            Round.opened_at,
            Round.closed_at,
            Round.closed_by,
        )
        .where(Round.task_pk == task_pk, condition)
        .order_by(Round.round_no)
    ).all()
    if not rounds:
        return []
    participants: dict[int, list[str]] = defaultdict(list)
    for round_pk, device_id in connection.execute(
        select(Update.round_pk, Device.device_id)
        .join(Device, Device.id == Update.device_pk)
        .where(Update.round_pk.in_([r.id for r in rounds]))
        .order_by(Update.id)
    ):
        participants[round_pk].append(device_id)
    return [
        RoundInfo(
            round_no=r.round_no,
            state=r.state,
            quorum=r.quorum,
            deadline=r.deadline,
            opened_at=r.opened_at,
            closed_at=r.closed_at,
            closed_by=r.closed_by,
            participants=participants[r.id],
            task_id=task_id,
        )
        for r in rounds
    ]


def list_devices(connection: Connection, fleet: str | None) -> list[DeviceInfo]:
    updates = select(func.count()).where(Update.device_pk == Device.id).scalar_subquery()
    query = (
        select(
            Fleet.name,
            Device.device_id,
            Device.presence,
            Device.presence_at,
            Device.first_seen_at,
            Device.last_seen_at,
            updates.label("updates"),
            Device.capabilities,
        )
        .join(Fleet, Fleet.id == Device.fleet_pk)
        .order_by(Fleet.name, Device.device_id)
    )
    if fleet is not None:
        query = query.where(Device.fleet_pk == fleet_pk(connection, fleet))
    return [DeviceInfo(*row) for row in connection.execute(query)]


def list_rounds(connection: Connection, fleet: str | None, task_id: str | None) -> list[RoundSummary]:
    in_scope: list[ColumnElement[bool]] = []  # conditions on Task / Round
    rejections_in_scope: list[ColumnElement[bool]] = [Rejection.round_no.is_not(None)]
    if fleet is not None:
        pk = fleet_pk(connection, fleet)
        in_scope.append(Task.fleet_pk == pk)
        rejections_in_scope.append(Rejection.fleet_pk == pk)
    if task_id is not None:
        in_scope.append(Round.task_pk == task_pk(connection, task_id))
        rejections_in_scope.append(Rejection.task_id == task_id)
    # One grouped pass over the rounds' updates (PostgreSQL sums BIGINT as NUMERIC: cast back to int).
    per_round = (
        select(
            Update.round_pk,
            func.count().label("participants"),
            cast(func.sum(Update.payload_bytes), BigInteger).label("payload_bytes"),
        )
        .join(Round, Round.id == Update.round_pk)
        .join(Task, Task.id == Round.task_pk)
        .where(*in_scope)
        .group_by(Update.round_pk)
        .subquery()
    )
    rejected = (
        select(Rejection.task_id, Rejection.round_no, func.count().label("rejections"))
        .where(*rejections_in_scope)
        .group_by(Rejection.task_id, Rejection.round_no)
        .subquery()
    )
    query = (
        select(
            Fleet.name,
            Task.task_id,
            Round.round_no,
            Round.state,
            Round.quorum,
            func.coalesce(per_round.c.participants, 0),
            func.coalesce(rejected.c.rejections, 0),
            func.coalesce(per_round.c.payload_bytes, 0),
            Round.opened_at,
            Round.deadline,
            Round.closed_at,
            Round.closed_by,
        )
        .join(Task, Task.id == Round.task_pk)
        .join(Fleet, Fleet.id == Task.fleet_pk)
        .outerjoin(per_round, per_round.c.round_pk == Round.id)
        .outerjoin(rejected, and_(rejected.c.task_id == Task.task_id, rejected.c.round_no == Round.round_no))
        .where(*in_scope)
        .order_by(Fleet.name, Task.task_id, Round.round_no)
    )
    return [
        RoundSummary(
            *row,
            duration_s=None if row.closed_at is None else (row.closed_at - row.opened_at).total_seconds(),
        )
        for row in connection.execute(query)
    ]


def round_detail(connection: Connection, task_id: str, round_no: int) -> RoundDetail | None:
    pk = task_pk(connection, task_id)
    found = round_infos(connection, pk, task_id, Round.round_no == round_no)
    if not found:
        return None
    round_pk = connection.scalar(select(Round.id).where(Round.task_pk == pk, Round.round_no == round_no))
    updates = [
        UpdateSummary(*row[:7], bool(row[7]), *row[8:])
        for row in connection.execute(
            select(
                Device.device_id,
                Update.base_round,
                Update.staleness,
                Update.weight,
                Update.num_samples,
                Update.payload_bytes,
                Update.payload_sha256,
                Blob.data.is_(None),
                Update.metrics,
                Update.received_at,
            )
            .join(Device, Device.id == Update.device_pk)
            .join(Blob, Blob.sha256 == Update.payload_sha256)
            .where(Update.round_pk == round_pk)
            .order_by(Update.id)
        )
    ]
    rejections = [
        RejectionInfo(*row)
        for row in connection.execute(
            select(
                Rejection.reason,
                Rejection.detail,
                Rejection.task_id,
                Rejection.round_no,
                Rejection.device_id,
                Rejection.topic,
                Rejection.payload_size,
                Rejection.received_at,
            )
            .where(Rejection.task_id == task_id, Rejection.round_no == round_no)
            .order_by(Rejection.id)
        )
    ]
    aggregate_row = connection.execute(
        select(
            Aggregate.payload_sha256, Aggregate.payload_bytes, Aggregate.num_updates, Aggregate.created_at
        ).where(Aggregate.round_pk == round_pk)
    ).one_or_none()
    fleet = connection.scalar(select(Fleet.name).join(Task, Task.fleet_pk == Fleet.id).where(Task.id == pk))
    return RoundDetail(
        fleet=fleet,
        round=found[0],
        updates=updates,
        rejections=rejections,
        aggregate=None if aggregate_row is None else AggregateInfo(*aggregate_row),
    )


MODEL_COLUMNS = (
    Fleet.name,
    Task.task_id,
    Device.device_id,
    PersonalizedModel.version,
    PersonalizedModel.accuracy,
    PersonalizedModel.num_test,
    PersonalizedModel.density,
    PersonalizedModel.latency_ms,
    PersonalizedModel.size_bytes,
    PersonalizedModel.peak_rss_bytes,
    PersonalizedModel.metrics,
    PersonalizedModel.created_at,
    PersonalizedModel.tflite_sha256,
    PersonalizedModel.weights_sha256,
    PersonalizedModel.mask_sha256,
)


def _models() -> Select[Any]:
    return (
        select(*MODEL_COLUMNS)
        .join(Task, Task.id == PersonalizedModel.task_pk)
        .join(Fleet, Fleet.id == Task.fleet_pk)
        .join(Device, Device.id == PersonalizedModel.device_pk)
    )


def _newest_versions() -> Any:
    """(task, device) -> the newest version number."""
    return (
        select(
            PersonalizedModel.task_pk,
            PersonalizedModel.device_pk,
            func.max(PersonalizedModel.version).label("version"),
        )
        .group_by(PersonalizedModel.task_pk, PersonalizedModel.device_pk)
        .subquery()
    )


def list_models(
    connection: Connection,
    fleet: str | None,
    task_id: str | None,
    min_accuracy: float | None,
    *,
    device_id: str | None = None,
    all_versions: bool = False,
    order: ModelOrder = "accuracy",
    descending: bool = True,
    limit: int | None = None,
) -> list[ModelInfo]:
    if order not in MODEL_ORDERS:
        raise ValueError(f"order: {order!r}; expected one of {', '.join(MODEL_ORDERS)}")
    column = getattr(PersonalizedModel, order)
    # Unreported values (NULL) sort last either way.
    ordering = [column.is_(None), column.desc() if descending else column.asc()]
    query = _models().order_by(
        *ordering, Fleet.name, Task.task_id, Device.device_id, PersonalizedModel.version.desc()
    )
    if not all_versions:
        newest = _newest_versions()
        query = query.join(
            newest,
            and_(
                newest.c.task_pk == PersonalizedModel.task_pk,
                newest.c.device_pk == PersonalizedModel.device_pk,
                newest.c.version == PersonalizedModel.version,
            ),
        )
    if fleet is not None:
        query = query.where(Task.fleet_pk == fleet_pk(connection, fleet))
    if task_id is not None:
        query = query.where(PersonalizedModel.task_pk == task_pk(connection, task_id))
    if device_id is not None:
        query = query.where(Device.device_id == device_id)
    if min_accuracy is not None:
        query = query.where(PersonalizedModel.accuracy >= min_accuracy)
    if limit is not None:
        query = query.limit(limit)
    return [ModelInfo(*row) for row in connection.execute(query)]


def model_history(connection: Connection, device_id: str, fleet: str | None) -> list[ModelInfo]:
    query = _models().where(Device.device_id == device_id)
    if fleet is not None:
        query = query.where(Task.fleet_pk == fleet_pk(connection, fleet))
    query = query.order_by(PersonalizedModel.created_at, PersonalizedModel.id)
    found = [ModelInfo(*row) for row in connection.execute(query)]
    if not found and connection.scalar(select(Device.id).where(Device.device_id == device_id)) is None:
        raise StorageError(f"unknown device {device_id!r}; `fedmask devices` lists the known ones")
    return found


def export_model(
    connection: Connection, device_id: str, fmt: ExportFormat, task_id: str | None, version: int | None = None
) -> bytes:
    """The stored bytes of one file of a device's personalized model (most recent task and newest
    version by default)."""
    query = (
        select(EXPORT_COLUMNS[fmt], Task.task_id, PersonalizedModel.version)
        .join(Task, Task.id == PersonalizedModel.task_pk)
        .join(Device, Device.id == PersonalizedModel.device_pk)
        .where(Device.device_id == device_id)
        .order_by(
            PersonalizedModel.created_at.desc(),
            PersonalizedModel.version.desc(),
            PersonalizedModel.id.desc(),
        )
        .limit(1)
    )
    if task_id is not None:
        query = query.where(PersonalizedModel.task_pk == task_pk(connection, task_id))
    if version is not None:
        query = query.where(PersonalizedModel.version == version)
    row = connection.execute(query).one_or_none()
    if row is None:
        scope = f" in task {task_id!r}" if task_id is not None else ""
        if version is not None:
            scope += f" with version {version}"
        raise StorageError(f"no personalized model stored for device {device_id!r}{scope}")
    digest, found_task, found_version = row
    return read_blob(
        connection,
        digest,
        f"{fmt} file of device {device_id!r}'s model for task {found_task!r}, version {found_version}",
    )


def task_status(connection: Connection, fleet: str | None, task_id: str | None) -> list[TaskStatus]:
    query = (
        select(
            Task.id,
            Task.fleet_pk,
            Fleet.name,
            Task.task_id,
            Task.strategy,
            Task.state,
            Task.schedule,
            Task.outcome,
            Task.state_at,
            Task.created_at,
        )
        .join(Fleet, Fleet.id == Task.fleet_pk)
        .order_by(Task.created_at, Task.task_id)
    )
    if fleet is not None:
        query = query.where(Task.fleet_pk == fleet_pk(connection, fleet))
    if task_id is not None:
        query = query.where(Task.id == task_pk(connection, task_id))
    return [_task_status(connection, row) for row in connection.execute(query).all()]


def _task_status(connection: Connection, task: Any) -> TaskStatus:
    closed = connection.scalar(select(func.count()).where(Round.task_pk == task.id, Round.state == "closed"))
    open_round = connection.scalar(
        select(func.max(Round.round_no)).where(Round.task_pk == task.id, Round.state == "open")
    )
    participants = set(
        connection.scalars(
            select(Device.device_id)
            .join(Update, Update.device_pk == Device.id)
            .where(Update.task_pk == task.id)
        )
    )
    with_model = set(
        connection.scalars(
            select(Device.device_id)
            .join(PersonalizedModel, PersonalizedModel.device_pk == Device.id)
            .where(PersonalizedModel.task_pk == task.id)
        )
    )
    if open_round is not None:
        # What the aggregator waits for: its participants and the fleet's online devices.
        online = set(
            connection.scalars(
                select(Device.device_id).where(Device.fleet_pk == task.fleet_pk, Device.presence == "online")
            )
        )
        contributed = set(
            connection.scalars(
                select(Device.device_id)
                .join(Update, Update.device_pk == Device.id)
                .join(Round, Round.id == Update.round_pk)
                .where(Round.task_pk == task.id, Round.round_no == open_round)
            )
        )
        missing = sorted((participants | online) - contributed)
    elif task.state == "done":
        missing = []
    else:
        missing = sorted(participants - with_model)
    rounds_total = (task.schedule or {}).get("rounds")
    return TaskStatus(
        fleet=task.name,
        task_id=task.task_id,
        strategy=task.strategy,
        state=task.state,
        rounds_closed=int(closed or 0),
        rounds_total=rounds_total if isinstance(rounds_total, int) else None,
        open_round=open_round,
        participants=len(participants),
        models=len(participants & with_model),
        missing=missing,
        outcome=task.outcome,
        state_at=task.state_at,
        created_at=task.created_at,
    )


def _listing(names: list[Any]) -> str:
    if not names:
        return "none yet"
    shown = ", ".join(repr(n) for n in names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")
