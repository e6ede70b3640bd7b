"""The store: the aggregator's durable write path, its resume reads, and the operators' queries.

Durability contract with the aggregator
- ``record_update`` commits before it returns, so the aggregator acknowledges the MQTT message only
  after the update is on disk; a crash before the commit means the broker redelivers it.
- Writes are idempotent by (task, round, device): a redelivered update returns False and changes nothing.
- On restart, ``latest_round`` and ``accepted_updates`` give back the open round's exact state.

One transaction per call; large bytes go to the content-addressed ``blobs`` table once.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Engine, case, func, select, tuple_, update
from sqlalchemy.engine import URL
from sqlalchemy.sql.dml import Insert

from fedmask.storage import housekeeping, mask_bases, migrate, queries, validation
from fedmask.storage.blobs import put_blob, read_blob, sha256_hex, verified
from fedmask.storage.engine import make_engine, normalize_url, read_transaction, write_transaction
from fedmask.storage.errors import RoundClosedError, StorageError
from fedmask.storage.records import (
    EXPORT_FORMATS,
    DeviceInfo,
    ExportFormat,
    ModelInfo,
    ModelOrder,
    NewPresence,
    NewRejection,
    NewUpdate,
    RoundDetail,
    RoundInfo,
    RoundSummary,
    StoredUpdate,
    TaskStatus,
)
from fedmask.storage.schema import (
    CLOSED_BY,
    TASK_STATES,
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
from fedmask.storage.statements import dialect_insert, hot_statements, insert_for, insert_updates
from fedmask.storage.types import require_utc, utcnow
from fedmask.storage.validation import INT32_MAX, INT64_MAX

logger = logging.getLogger(__name__)

# A rejection's detail is for humans; a hostile message must not make us store megabytes of it.
MAX_REJECTION_DETAIL = 2000
# Rows fetched per batch while streaming a round's payloads.
_STREAM_BATCH = 16


@dataclass(frozen=True)
class _TaskRef:
    pk: int
    fleet_pk: int


class Store:
    """A SQLite or PostgreSQL database holding fleets, rounds, updates and personalized models.

    ``Store("sqlite:///fedmask.db")`` or ``Store("postgresql+psycopg://user@host/db")``. Safe to share
    between threads; several processes may write to the same database at once.
    """

    def __init__(self, url: str | URL, *, sqlite_synchronous: str = "FULL") -> None:
        self.url = normalize_url(url)
        self.sqlite_synchronous = sqlite_synchronous
        self._engine = make_engine(self.url, sqlite_synchronous=sqlite_synchronous)
        # Row ids never change once assigned (nothing deletes fleets, tasks or devices): cache them to
        # keep lookups off the write path.
        self._fleet_pks: dict[str, int] = {}
        self._tasks: dict[str, _TaskRef] = {}
        self._device_pks: dict[tuple[int, str], int] = {}

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for tools and tests that need raw SQL; the store's API is the contract."""
        return self._engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    def close(self) -> None:
        """Release every pooled connection."""
        self._engine.dispose()

    # -- schema -------------------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Migrate the database to the newest schema; idempotent and safe for concurrent starters."""
        migrate.upgrade(self._engine)

    def check_schema(self) -> None:
        """Raise StorageError unless the database is at the schema this code expects."""
        with read_transaction(self._engine) as connection:
            current = migrate.current_revision(connection)
        head = migrate.head_revision()
        if current != head:
            where = self.url.render_as_string(hide_password=True)
            found = "no fedmask schema" if current is None else f"schema revision {current}"
            raise StorageError(f"database {where} has {found}, expected {head}; run `fedmask db upgrade`")

    # -- fleets, tasks, devices ----------------------------------------------------------------------

    def register_task(
        self,
        fleet: str,
        task_id: str,
        *,
        spec: dict[str, Any],
        seed: int,
        weights_digest: str,
        strategy: str,
        arch: str,
        schedule: dict[str, Any] | None = None,
    ) -> None:
        """Record a task (and its fleet, if new). Registering the same task again is a no-op; the same
        task id with a different fleet, seed, digest, strategy, arch or spec is refused. ``schedule``
        (rounds, quorum, deadlines) is kept as the newest registration gives it: an operator may
        lengthen a run."""
        values = {
            "task_id": validation.name(task_id, "task_id"),
            "spec": validation.json_document(spec, "spec"),
            "seed": validation.integer(seed, "seed"),
            "weights_digest": validation.name(weights_digest, "weights_digest"),
            "strategy": validation.name(strategy, "strategy", 64),
            "arch": validation.name(arch, "arch"),
        }
        validation.name(fleet, "fleet")
        now = utcnow()
        with write_transaction(self._engine) as connection:
            values["fleet_pk"] = self._fleet_pk(connection, fleet, now)
            connection.execute(
                insert_for(connection, Task)
                .values(**values, created_at=now)
                .on_conflict_do_nothing(index_elements=[Task.task_id])
            )
            stored = connection.execute(
                select(*(getattr(Task, key) for key in values)).where(Task.task_id == task_id)
            ).one()
            differing = [key for key in values if getattr(stored, key) != values[key]]
            if differing:
                raise StorageError(
                    f"task {task_id!r} is already registered with a different {', '.join(differing)}; "
                    "a task id names one set of frozen weights for good, so register a new task id"
                )
            if schedule is not None:
                connection.execute(
                    update(Task)
                    .where(Task.task_id == task_id)
                    .values(schedule=validation.json_document(schedule, "schedule"))
                )

    def set_task_state(self, task_id: str, state: str, outcome: str | None = None) -> None:
        """Record where the aggregator got with a task: running, finalizing, done or failed (with
        ``outcome``, one line saying why)."""
        if state not in TASK_STATES:
            raise ValueError(f"state: {state!r}; expected one of {TASK_STATES}")
        with write_transaction(self._engine) as connection:
            self._task(connection, task_id)
            connection.execute(
                update(Task)
                .where(Task.task_id == task_id)
                .values(state=state, outcome=outcome, state_at=utcnow())
            )

    def upsert_device(
        self,
        fleet: str,
        device_id: str,
        *,
        capabilities: dict[str, Any] | None = None,
        presence: str | None = None,
        seen_at: dt.datetime | None = None,
    ) -> None:
        """Create or refresh a device. ``seen_at`` (default now) only ever moves last-seen forward; the
        presence observed latest wins, so a late-delivered old presence message cannot overwrite it.
        Capabilities replace the stored ones when given. (The aggregator writes presences with its
        batches instead: ``record_batch(presences=...)``, the same rules.)"""
        seen = NewPresence(fleet, device_id, presence=presence, seen_at=seen_at, capabilities=capabilities)
        self.record_batch(None, None, presences=[seen])

    # -- rounds and updates --------------------------------------------------------------------------

    def open_round(self, task_id: str, round_no: int, *, quorum: int, deadline: dt.datetime) -> None:
        """Open round ``round_no`` of a task; opening it again is a no-op (the first quorum and deadline
        stay)."""
        validation.integer(round_no, "round_no", minimum=0, maximum=INT32_MAX)
        validation.integer(quorum, "quorum", minimum=1, maximum=INT32_MAX)
        deadline = require_utc(deadline, "deadline")
        now = utcnow()
        with write_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            connection.execute(
                insert_for(connection, Round)
                .values(
                    task_pk=task.pk,
                    round_no=round_no,
                    state="open",
                    quorum=quorum,
                    deadline=deadline,
                    opened_at=now,
                )
                .on_conflict_do_nothing(index_elements=[Round.task_pk, Round.round_no])
            )

    def record_update(
        self,
        task_id: str,
        round_no: int,
        device_id: str,
        *,
        base_round: int,
        staleness: int,
        weight: float,
        num_samples: int,
        payload: bytes,
        metrics: dict[str, Any],
    ) -> bool:
        """Store an accepted update and commit before returning True.

        Returns False, changing nothing, when (task, round, device) or (task, device, base round) is
        already stored: the broker redelivered it, or the device republished it while a later round was
        open (see :meth:`find_update`). Raises RoundClosedError for a new update to a closed round. A
        device not seen before is registered in the task's fleet: an update is proof it exists.
        """
        update = NewUpdate(device_id, base_round, staleness, weight, num_samples, payload, metrics)
        return self.record_batch(task_id, round_no, [update])[0]

    def record_batch(
        self,
        task_id: str | None,
        round_no: int | None,
        updates: Sequence[NewUpdate] = (),
        rejections: Sequence[NewRejection] = (),
        presences: Sequence[NewPresence] = (),
    ) -> list[bool]:
        """Store accepted updates of one round, refused messages and devices seen (presences) in ONE
        committed transaction (the aggregator's group commit); per update, True if stored, False if it
        already was (as :meth:`record_update`, whose rules each update follows; a device named twice is
        stored once). Presences follow the rules of :meth:`upsert_device`, in the order given, and are
        written first: an update from a device first seen in the same batch finds its row.

        All or nothing: a closed round (``RoundClosedError``) or a bad value stores none of them.
        """
        updates, rejections = list(updates), list(rejections)
        if updates:
            if task_id is None or round_no is None:
                raise ValueError("record_batch: updates need their task_id and round_no")
            validation.integer(round_no, "round_no", minimum=0, maximum=INT32_MAX)
        now = utcnow()
        rows = [_update_values(update) for update in updates]
        rejected = [_rejection_values(rejection) for rejection in rejections]
        devices = _device_values(presences, now)
        if not rows and not rejected and not devices:
            return []
        with write_transaction(self._engine) as connection:
            seen = self._upsert_devices(connection, devices, now) if devices else set()
            created = self._insert_updates(connection, task_id, round_no, rows, now, seen) if rows else []
            if rejected:
                for row in rejected:
                    row["fleet_pk"] = self._fleet_pk(connection, row.pop("fleet"), now)
                    row["received_at"] = now
                connection.execute(insert_for(connection, Rejection), rejected)
        return created

    def _insert_updates(
        self,
        connection: Connection,
        task_id: str,
        round_no: int,
        rows: list[dict[str, Any]],
        now: dt.datetime,
        seen: set[tuple[int, str]],
    ) -> list[bool]:
        hot = hot_statements(connection.dialect.name)
        task = self._task(connection, task_id)
        device_ids = [row["device_id"] for row in rows]
        device_pks = self._device_pks_of(connection, task.fleet_pk, device_ids, now, uncommitted=seen)
        round_row = connection.execute(
            hot.round_state, {"task_pk": task.pk, "round_no": round_no}
        ).one_or_none()
        if round_row is None:
            raise StorageError(f"task {task_id!r} has no round {round_no}; open_round() it first")
        # Already stored, by (round, device) or (task, device, base round): redeliveries change nothing.
        keys = [(pk, row["base_round"]) for pk, row in zip(device_pks, rows, strict=True)]
        stored = set(
            connection.scalars(
                select(Update.device_pk).where(
                    Update.task_pk == task.pk,
                    (Update.round_pk == round_row.id) & Update.device_pk.in_(device_pks)
                    | tuple_(Update.device_pk, Update.base_round).in_(keys),
                )
            )
        )
        if round_row.state != "open":
            if any(pk not in stored for pk in device_pks):
                raise RoundClosedError(f"round {round_no} of task {task_id!r} is closed; update refused")
            return [False] * len(rows)
        # A device named twice in one batch: the first one counts.
        first = {pk: index for index, pk in reversed(list(enumerate(device_pks)))}
        fresh = [i for i, pk in enumerate(device_pks) if pk not in stored and first[pk] == i]
        if not fresh:
            return [False] * len(rows)
        blobs = {rows[i]["payload_sha256"]: rows[i]["payload"] for i in fresh}
        connection.execute(
            hot.put_blob,
            [{"sha256": d, "size_bytes": len(b), "data": b, "created_at": now} for d, b in blobs.items()],
        )
        inserts = []
        for i in fresh:
            values = {k: v for k, v in rows[i].items() if k not in ("device_id", "masks", "payload")}
            values["device_pk"] = device_pks[i]
            inserts.append(values)
        # RETURNING, not rowcount: drivers report -1 for an INSERT ... ON CONFLICT DO NOTHING. The unique
        # keys decide between concurrent writers: a row another writer stored meanwhile is not returned
        # (its blob stays, unreferenced, until `prune`).
        new = insert_updates(connection, task.pk, round_row.id, now, inserts)
        created = [pk in new and first[pk] == index for index, pk in enumerate(device_pks)]
        if new:
            connection.execute(hot.touch_devices, {"device_pks": sorted(new), "now": now})
        bases = {
            device_pks[i]: (*row["masks"], row["payload_sha256"])
            for i, row in enumerate(rows)
            if created[i] and row["masks"]
        }
        if bases:
            mask_bases.replace_masks(connection, task.pk, bases, now)
        return created

    def _upsert_devices(
        self, connection: Connection, devices: list[dict[str, Any]], now: dt.datetime
    ) -> set[tuple[int, str]]:
        """Write the batch's devices (``_device_values``: one row each), one executemany per kind of
        row; returns their (fleet_pk, device_id), rows this transaction may have created."""
        kinds: dict[tuple[bool, bool], list[dict[str, Any]]] = {}
        for given in devices:
            row = {key: value for key, value in given.items() if key != "fleet"}
            row["fleet_pk"] = self._fleet_pk(connection, given["fleet"], now)
            kinds.setdefault((row["capabilities"] is not None, row["presence"] is not None), []).append(row)
        for (capabilities, presence), rows in kinds.items():
            connection.execute(_device_upsert(connection.dialect.name, capabilities, presence), rows)
        return {(row["fleet_pk"], row["device_id"]) for rows in kinds.values() for row in rows}

    def record_rejection(
        self,
        fleet: str,
        *,
        reason: str,
        detail: str,
        task_id: str | None = None,
        round_no: int | None = None,
        device_id: str | None = None,
        topic: str | None = None,
        payload_size: int | None = None,
    ) -> None:
        """Record a refused message. Task, round and device are whatever the message claimed, if anything;
        they need not exist (an unknown device is itself a reason to refuse)."""
        rejection = NewRejection(fleet, reason, detail, task_id, round_no, device_id, topic, payload_size)
        self.record_batch(None, None, rejections=[rejection])

    def find_update(self, task_id: str, device_id: str, base_round: int) -> tuple[int, str] | None:
        """Where the update of ``device_id`` trained from ``base_round`` is stored, in any round of the
        task: ``(round_no, payload_sha256)``, or None. The idempotency key of an update."""
        with read_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            row = connection.execute(
                select(Round.round_no, Update.payload_sha256)
                .join(Round, Round.id == Update.round_pk)
                .join(Device, Device.id == Update.device_pk)
                .where(
                    Update.task_pk == task.pk,
                    Device.device_id == device_id,
                    Update.base_round == base_round,
                )
            ).one_or_none()
            return None if row is None else (row.round_no, row.payload_sha256)

    def task_participants(self, task_id: str) -> set[str]:
        """Devices with at least one accepted update in any round of the task: the ones that joined it."""
        with read_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            return set(
                connection.scalars(
                    select(Device.device_id)
                    .join(Update, Update.device_pk == Device.id)
                    .where(Update.task_pk == task.pk)
                    .distinct()
                )
            )

    def accepted_updates(self, task_id: str, round_no: int) -> list[StoredUpdate]:
        """Every accepted update of a round, in arrival order, payloads integrity-checked."""
        return list(self.iter_accepted_updates(task_id, round_no))

    def iter_accepted_updates(self, task_id: str, round_no: int) -> Iterator[StoredUpdate]:
        """Like :meth:`accepted_updates`, streaming: a few payloads in memory at a time."""
        with read_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            rows = connection.execution_options(stream_results=True, yield_per=_STREAM_BATCH).execute(
                select(
                    Device.device_id,
                    Update.base_round,
                    Update.staleness,
                    Update.weight,
                    Update.num_samples,
                    Update.payload_sha256,
                    Blob.data,
                    Update.metrics,
                    Update.received_at,
                )
                .join(Round, Round.id == Update.round_pk)
                .join(Device, Device.id == Update.device_pk)
                .join(Blob, Blob.sha256 == Update.payload_sha256)
                .where(Round.task_pk == task.pk, Round.round_no == round_no)
                .order_by(Update.id)
            )
            for row in rows:
                owner = f"update of device {row.device_id!r}, round {round_no} of task {task_id!r}"
                yield StoredUpdate(
                    device_id=row.device_id,
                    base_round=row.base_round,
                    staleness=row.staleness,
                    weight=row.weight,
                    num_samples=row.num_samples,
                    payload=verified(row.payload_sha256, row.data, owner),
                    metrics=row.metrics,
                    received_at=row.received_at,
                )

    def close_round(
        self, task_id: str, round_no: int, *, aggregate: bytes, closed_by: Literal["quorum", "deadline"]
    ) -> None:
        """Close a round with its aggregate. Idempotent: once closed, the first aggregate stays (a later
        call with different bytes is logged and ignored, so competing closers agree on one)."""
        if closed_by not in CLOSED_BY:
            raise ValueError(f"closed_by: {closed_by!r}; expected one of {CLOSED_BY}")
        aggregate = validation.as_bytes(aggregate, "aggregate")
        now = utcnow()
        with write_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            round_row = connection.execute(
                select(Round.id, Round.state, Round.closed_by)
                .where(Round.task_pk == task.pk, Round.round_no == round_no)
                .with_for_update()
            ).one_or_none()
            if round_row is None:
                raise StorageError(f"task {task_id!r} has no round {round_no} to close")
            if round_row.state == "closed":
                stored = connection.scalar(
                    select(Aggregate.payload_sha256).where(Aggregate.round_pk == round_row.id)
                )
                if stored != sha256_hex(aggregate) or round_row.closed_by != closed_by:
                    logger.warning(
                        "round %d of task %s was already closed (by %s, aggregate %s); keeping that",
                        round_no,
                        task_id,
                        round_row.closed_by,
                        stored,
                    )
                return
            num_updates = connection.scalar(
                select(func.count()).select_from(Update).where(Update.round_pk == round_row.id)
            )
            connection.execute(
                insert_for(connection, Aggregate).values(
                    round_pk=round_row.id,
                    payload_sha256=put_blob(connection, aggregate, now),
                    payload_bytes=len(aggregate),
                    num_updates=num_updates,
                    created_at=now,
                )
            )
            connection.execute(
                update(Round)
                .where(Round.id == round_row.id)
                .values(state="closed", closed_at=now, closed_by=closed_by)
            )

    def get_round(self, task_id: str, round_no: int) -> RoundInfo | None:
        """A round's state and participants, or None if it was never opened."""
        with read_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            found = queries.round_infos(connection, task.pk, task_id, Round.round_no == round_no)
            return found[0] if found else None

    def latest_round(self, task_id: str) -> RoundInfo | None:
        """The highest-numbered round of a task (what a restarted aggregator resumes), or None."""
        with read_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            newest = select(func.max(Round.round_no)).where(Round.task_pk == task.pk).scalar_subquery()
            found = queries.round_infos(connection, task.pk, task_id, Round.round_no == newest)
            return found[0] if found else None

    def open_rounds(self, task_id: str) -> list[RoundInfo]:
        """Every round of a task still open, oldest first."""
        with read_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            return queries.round_infos(connection, task.pk, task_id, Round.state == "open")

    def get_aggregate(self, task_id: str, round_no: int) -> bytes | None:
        """The aggregate a round closed with (integrity-checked), or None while it is open."""
        with read_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            digest = connection.scalar(
                select(Aggregate.payload_sha256)
                .join(Round, Round.id == Aggregate.round_pk)
                .where(Round.task_pk == task.pk, Round.round_no == round_no)
            )
            if digest is None:
                return None
            return read_blob(connection, digest, f"aggregate of round {round_no} of task {task_id!r}")

    # -- personalized models -------------------------------------------------------------------------

    def save_personalized_model(
        self,
        task_id: str,
        device_id: str,
        *,
        mask: bytes,
        weights: bytes,
        tflite: bytes,
        accuracy: float,
        latency_ms: float,
        size_bytes: int,
        peak_rss_bytes: int,
        metrics: dict[str, Any],
        num_test: int | None = None,
        density: float | None = None,
    ) -> int:
        """Store a device's final model for a task and return its version. ``weights`` is a
        safetensors file, ``mask`` the encoded mask, ``tflite`` the model file; all stored as given.
        The same files as the newest version (a redelivered result) are that version again, unchanged;
        other files are the next version (the device finalized again)."""
        validation.name(device_id, "device_id")
        files = {
            "mask": validation.as_bytes(mask, "mask"),
            "weights": validation.as_bytes(weights, "weights"),
            "tflite": validation.as_bytes(tflite, "tflite"),
        }
        scores = {
            "accuracy": validation.finite(accuracy, "accuracy", minimum=0.0, maximum=1.0),
            "latency_ms": validation.finite(latency_ms, "latency_ms", minimum=0.0),
            "size_bytes": validation.integer(size_bytes, "size_bytes", minimum=0),
            "peak_rss_bytes": validation.integer(peak_rss_bytes, "peak_rss_bytes", minimum=0),
            "num_test": None if num_test is None else validation.integer(num_test, "num_test", minimum=0),
            "density": None
            if density is None
            else validation.finite(density, "density", minimum=0.0, maximum=1.0),
            "metrics": validation.json_document(metrics, "metrics"),
        }
        digests = {f"{kind}_sha256": sha256_hex(data) for kind, data in files.items()}
        now = utcnow()
        with write_transaction(self._engine) as connection:
            task = self._task(connection, task_id)
            device_pk = self._device_pk(connection, task.fleet_pk, device_id, now)
            newest = connection.execute(
                select(PersonalizedModel.version, *(getattr(PersonalizedModel, k) for k in digests))
                .where(PersonalizedModel.task_pk == task.pk, PersonalizedModel.device_pk == device_pk)
                .order_by(PersonalizedModel.version.desc())
                .limit(1)
            ).one_or_none()
            if newest is not None and all(getattr(newest, k) == v for k, v in digests.items()):
                return newest.version
            for data in files.values():
                put_blob(connection, data, now)
            version = 1 if newest is None else newest.version + 1
            connection.execute(
                insert_for(connection, PersonalizedModel).values(
                    task_pk=task.pk, device_pk=device_pk, version=version, **digests, **scores, created_at=now
                )
            )
        return version

    def export_model(
        self, device_id: str, fmt: ExportFormat, task_id: str | None = None, version: int | None = None
    ) -> bytes:
        """The stored bytes of a device's model: ``tflite`` (the .tflite file), ``torch`` (fine-tuned
        weights, safetensors) or ``mask``. Without ``task_id``, the device's most recent model; without
        ``version``, the task's newest version."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"format: {fmt!r}; expected one of {EXPORT_FORMATS}")
        if version is not None:
            validation.integer(version, "version", minimum=1)
        with read_transaction(self._engine) as connection:
            return queries.export_model(connection, device_id, fmt, task_id, version)

    # -- operator queries ----------------------------------------------------------------------------

    def list_devices(self, fleet: str | None = None) -> list[DeviceInfo]:
        """Devices (of one fleet, or all) with presence, last seen and accepted-update count."""
        with read_transaction(self._engine) as connection:
            return queries.list_devices(connection, fleet)

    def list_rounds(self, fleet: str | None = None, task_id: str | None = None) -> list[RoundSummary]:
        """Rounds with participation and timing, oldest first within each task."""
        with read_transaction(self._engine) as connection:
            return queries.list_rounds(connection, fleet, task_id)

    def round_detail(self, task_id: str, round_no: int) -> RoundDetail | None:
        """One round in full: accepted updates, rejections with reasons, the aggregate."""
        with read_transaction(self._engine) as connection:
            return queries.round_detail(connection, task_id, round_no)

    def list_models(
        self,
        fleet: str | None = None,
        task_id: str | None = None,
        min_accuracy: float | None = None,
        *,
        device_id: str | None = None,
        all_versions: bool = False,
        order: ModelOrder = "accuracy",
        descending: bool = True,
        limit: int | None = None,
    ) -> list[ModelInfo]:
        """Personalized models (each device's newest version per task unless ``all_versions``),
        sorted by ``order`` (accuracy, latency_ms, size_bytes, density, num_test, created_at), best
        accuracy first by default; at most ``limit`` rows."""
        if limit is not None:
            validation.integer(limit, "limit", minimum=1)
        with read_transaction(self._engine) as connection:
            return queries.list_models(
                connection,
                fleet,
                task_id,
                min_accuracy,
                device_id=device_id,
                all_versions=all_versions,
                order=order,
                descending=descending,
                limit=limit,
            )

    def model_history(self, device_id: str, fleet: str | None = None) -> list[ModelInfo]:
        """Every version of a device's models over all its tasks, oldest first."""
        with read_transaction(self._engine) as connection:
            return queries.model_history(connection, device_id, fleet)

    def task_status(self, fleet: str | None = None, task_id: str | None = None) -> list[TaskStatus]:
        """Each task's rounds done of total, state, and the devices it waits for."""
        with read_transaction(self._engine) as connection:
            return queries.task_status(connection, fleet, task_id)

    # -- housekeeping --------------------------------------------------------------------------------

    def prune(self, keep_last: int) -> int:
        """Release the payload bytes of updates outside each task's newest ``keep_last`` rounds (open
        rounds are always kept) and of blobs nothing refers to. Metadata stays. Returns blobs freed."""
        validation.integer(keep_last, "keep_last", minimum=0)
        with write_transaction(self._engine) as connection:
            freed = housekeeping.prune(connection, keep_last)
        logger.info(
            "pruned %d blobs, keeping the payloads of the last %d rounds of each task", freed, keep_last
        )
        return freed

    # -- row-id lookups ------------------------------------------------------------------------------

    # Only ids read back as already committed are cached: an id inserted by this transaction would be
    # stale if the transaction rolled back.

    def _fleet_pk(self, connection: Connection, fleet: str, now: dt.datetime) -> int:
        if (pk := self._fleet_pks.get(fleet)) is not None:
            return pk
        query = select(Fleet.id).where(Fleet.name == fleet)
        if (pk := connection.scalar(query)) is not None:
            self._fleet_pks[fleet] = pk
            return pk
        connection.execute(
            insert_for(connection, Fleet)
            .values(name=fleet, created_at=now)
            .on_conflict_do_nothing(index_elements=[Fleet.name])
        )
        return connection.scalar(query)

    def _task(self, connection: Connection, task_id: str) -> _TaskRef:
        if (ref := self._tasks.get(task_id)) is not None:
            return ref
        row = connection.execute(select(Task.id, Task.fleet_pk).where(Task.task_id == task_id)).one_or_none()
        if row is None:
            raise StorageError(f"unknown task {task_id!r}; register_task() it first")
        ref = self._tasks[task_id] = _TaskRef(row.id, row.fleet_pk)
        return ref

    def _device_pks_of(
        self,
        connection: Connection,
        fleet_pk: int,
        device_ids: list[str],
        now: dt.datetime,
        *,
        uncommitted: Container[tuple[int, str]] = (),
    ) -> list[int]:
        """``_device_pk`` of many devices: one query for those not cached (a fleet's first round).
        ``uncommitted``: devices this transaction wrote (a batch's presences): read, not cached."""
        missing = sorted({d for d in device_ids if (fleet_pk, d) not in self._device_pks})
        found: dict[str, int] = {}
        if missing:
            for device_id, pk in connection.execute(
                select(Device.device_id, Device.id).where(
                    Device.fleet_pk == fleet_pk, Device.device_id.in_(missing)
                )
            ):
                if (fleet_pk, device_id) in uncommitted:
                    found[device_id] = pk
                else:
                    self._device_pks[(fleet_pk, device_id)] = pk
        return [found[d] if d in found else self._device_pk(connection, fleet_pk, d, now) for d in device_ids]

    def _device_pk(self, connection: Connection, fleet_pk: int, device_id: str, now: dt.datetime) -> int:
        key = (fleet_pk, device_id)
        if (pk := self._device_pks.get(key)) is not None:
            return pk
        query = select(Device.id).where(Device.fleet_pk == fleet_pk, Device.device_id == device_id)
        if (pk := connection.scalar(query)) is not None:
            self._device_pks[key] = pk
            return pk
        connection.execute(
            insert_for(connection, Device)
            .values(fleet_pk=fleet_pk, device_id=device_id, first_seen_at=now, last_seen_at=now)
            .on_conflict_do_nothing(index_elements=[Device.fleet_pk, Device.device_id])
        )
        return connection.scalar(query)


def _fits(value: Any, minimum: int, maximum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum


def _earlier(stored: Any, given: Any) -> Any:
    """SQL for the earlier of two timestamps (portable: SQLite has no LEAST)."""
    return case((given < stored, given), else_=stored)


def _later(stored: Any, given: Any) -> Any:
    return case((given > stored, given), else_=stored)


@functools.cache
def _device_upsert(dialect_name: str, capabilities: bool, presence: bool) -> Insert:
    """The INSERT ... ON CONFLICT DO UPDATE of ``upsert_device``'s rules, for rows with or without
    capabilities and presence (executemany binds values only: one statement per kind)."""
    insert = dialect_insert(dialect_name, Device)
    new = insert.excluded
    changes: dict[str, Any] = {
        "first_seen_at": _earlier(Device.first_seen_at, new.first_seen_at),
        "last_seen_at": _later(Device.last_seen_at, new.last_seen_at),
    }
    if capabilities:
        changes["capabilities"] = new.capabilities
    if presence:
        newer = Device.presence_at.is_(None) | (Device.presence_at <= new.presence_at)
        changes["presence"] = case((newer, new.presence), else_=Device.presence)
        changes["presence_at"] = case((newer, new.presence_at), else_=Device.presence_at)
    return insert.on_conflict_do_update(index_elements=[Device.fleet_pk, Device.device_id], set_=changes)


def _device_values(presences: Sequence[NewPresence], now: dt.datetime) -> list[dict[str, Any]]:
    """The presences checked (bad values raise before anything is written) and merged into one row per
    device by ``upsert_device``'s rules, in order: earliest first-seen, latest last-seen, the presence
    with the latest time (the later one on a tie), the last capabilities given."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for given in presences:
        fleet = validation.name(given.fleet, "fleet")
        device_id = validation.name(given.device_id, "device_id")
        capabilities = given.capabilities
        if capabilities is not None:
            capabilities = validation.json_document(capabilities, "capabilities")
        presence = given.presence
        if presence is not None:
            validation.name(presence, "presence", 32)
        seen = now if given.seen_at is None else require_utc(given.seen_at, "seen_at")
        row = merged.get((fleet, device_id))
        if row is None:
            merged[(fleet, device_id)] = {
                "fleet": fleet,
                "device_id": device_id,
                "capabilities": capabilities,
                "presence": presence,
                "presence_at": seen if presence is not None else None,
                "first_seen_at": seen,
                "last_seen_at": seen,
            }
            continue
        row["first_seen_at"] = min(row["first_seen_at"], seen)
        row["last_seen_at"] = max(row["last_seen_at"], seen)
        if capabilities is not None:
            row["capabilities"] = capabilities
        if presence is not None and (row["presence_at"] is None or row["presence_at"] <= seen):
            row["presence"], row["presence_at"] = presence, seen
    return list(merged.values())


def _update_values(update: NewUpdate) -> dict[str, Any]:
    """An update's columns, checked (bad values raise before anything is written)."""
    payload = validation.as_bytes(update.payload, "payload")
    return {
        "device_id": validation.name(update.device_id, "device_id"),
        "base_round": validation.integer(update.base_round, "base_round", minimum=0, maximum=INT32_MAX),
        "staleness": validation.integer(update.staleness, "staleness", minimum=0, maximum=INT32_MAX),
        "weight": validation.finite(update.weight, "weight", minimum=0.0),
        "num_samples": validation.integer(update.num_samples, "num_samples", minimum=0, maximum=INT32_MAX),
        "metrics": validation.json_document(update.metrics, "metrics"),
        "payload": payload,
        "payload_sha256": update.payload_sha256 or sha256_hex(payload),
        "payload_bytes": len(payload),
        "masks": update.masks,
    }


def _rejection_values(rejection: NewRejection) -> dict[str, Any]:
    """A rejection's columns. What a refused message claimed may itself be garbage: keep what fits."""
    validation.name(rejection.fleet, "fleet")
    validation.name(rejection.reason, "reason", 64)
    if not isinstance(rejection.detail, str):
        raise TypeError(f"detail: expected a string, got {type(rejection.detail).__name__}")
    task_id, device_id, topic = rejection.task_id, rejection.device_id, rejection.topic
    return {
        "fleet": rejection.fleet,
        "reason": rejection.reason,
        "detail": rejection.detail[:MAX_REJECTION_DETAIL],
        "task_id": None if task_id is None else str(task_id)[:128],
        "round_no": rejection.round_no if _fits(rejection.round_no, 0, INT32_MAX) else None,
        "device_id": None if device_id is None else str(device_id)[:128],
        "topic": None if topic is None else str(topic)[:512],
        "payload_size": rejection.payload_size if _fits(rejection.payload_size, 0, INT64_MAX) else None,
    }
