"""The store's tables as SQLAlchemy 2 typed declarative models.

Row ids (``id``) are surrogate keys; the names the rest of the system uses travel in their own columns
(``fleets.name``, ``tasks.task_id``, ``devices.device_id``). Foreign-key columns end in ``_pk`` so they
are never mistaken for those names. Large bytes (update payloads, aggregates, model files) live once in
``blobs``, addressed by their SHA-256.

Every change here needs an Alembic migration in ``migrations/versions``; ``tests/test_storage_migrations.py``
fails when the migrations and these models disagree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fedmask.storage.types import JSONDocument, RowId, UTCDateTime

# Deterministic constraint names, so migrations can address them identically on both engines.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SHA256_HEX = String(64)
ROUND_STATES = ("open", "closed")
CLOSED_BY = ("quorum", "deadline")
# What the aggregator last said of a task: rounds running, waiting for the personalized models, or
# ended (every participant reported / a deadline passed with models missing).
TASK_STATES = ("running", "finalizing", "done", "failed")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UTCDateTime(), dict[str, Any]: JSONDocument}


class Blob(Base):
    """Bytes stored once, addressed by SHA-256. ``data`` is NULL once pruned; the row stays as a record."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(SHA256_HEX, primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime]


class Fleet(Base):
    __tablename__ = "fleets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[dt.datetime]


class Task(Base):
    """A training task: what every party needs to derive the same frozen weights, its schedule, and
    where the aggregator got with it (``state``; NULL for tasks stored before migration 0004)."""

    __tablename__ = "tasks"
    __table_args__ = (CheckConstraint(f"state IN {TASK_STATES!r}", name="state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str] = mapped_column(String(128), unique=True)
    fleet_pk: Mapped[int] = mapped_column(ForeignKey("fleets.id"), index=True)
    spec: Mapped[dict[str, Any]]
    seed: Mapped[int] = mapped_column(BigInteger)
    weights_digest: Mapped[str] = mapped_column(String(128))
    strategy: Mapped[str] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime]
    schedule: Mapped[dict[str, Any] | None]  # rounds, quorum, deadlines (protocol.messages.Schedule)
    state: Mapped[str | None] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(Text)  # why it failed, in one line
    state_at: Mapped[dt.datetime | None]


class Device(Base):
    """A device of a fleet, as its agent reported itself, and when it was last heard from."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("fleet_pk", "device_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fleet_pk: Mapped[int] = mapped_column(ForeignKey("fleets.id"))
    device_id: Mapped[str] = mapped_column(String(128))
    capabilities: Mapped[dict[str, Any] | None]
    presence: Mapped[str | None] = mapped_column(String(32))
    presence_at: Mapped[dt.datetime | None]
    first_seen_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime]


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("task_pk", "round_no"),
        CheckConstraint(f"state IN {ROUND_STATES!r}", name="state"),
        CheckConstraint(f"closed_by IN {CLOSED_BY!r}", name="closed_by"),
        CheckConstraint(
            "(state = 'open' AND closed_at IS NULL AND closed_by IS NULL)"
            " OR (state = 'closed' AND closed_at IS NOT NULL AND closed_by IS NOT NULL)",
            name="closed_consistent",
        ),
        CheckConstraint("quorum >= 1", name="quorum_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    round_no: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(8))
    quorum: Mapped[int] = mapped_column(Integer)
    deadline: Mapped[dt.datetime]
    opened_at: Mapped[dt.datetime]
    closed_at: Mapped[dt.datetime | None]
    closed_by: Mapped[str | None] = mapped_column(String(16))


class Update(Base):
    """An accepted update. At most one per (round, device), and at most one per (task, device, base
    round) across every round of the task: a stale update republished while a later round is open is
    the same update, not a new one. Together these make ingest idempotent."""

    __tablename__ = "updates"
    __table_args__ = (
        UniqueConstraint("round_pk", "device_pk"),
        UniqueConstraint("task_pk", "device_pk", "base_round"),
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    round_pk: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    base_round: Mapped[int] = mapped_column(Integer)
    staleness: Mapped[int] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Double)
    num_samples: Mapped[int] = mapped_column(Integer)
    payload_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    payload_bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]]
    received_at: Mapped[dt.datetime]


class Rejection(Base):
    """A refused message. Loosely attributed on purpose: an unknown task or device is a reason to refuse,
    so task, round and device are kept as the names the message carried, not as foreign keys."""

    __tablename__ = "rejections"
    __table_args__ = (Index(None, "task_id", "round_no"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    fleet_pk: Mapped[int] = mapped_column(ForeignKey("fleets.id"), index=True)
    task_id: Mapped[str | None] = mapped_column(String(128))
    round_no: Mapped[int | None] = mapped_column(Integer)
    device_id: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    topic: Mapped[str | None] = mapped_column(String(512))
    payload_size: Mapped[int | None] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime]


class Aggregate(Base):
    """The global state a round closed with."""

    __tablename__ = "aggregates"

    round_pk: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    payload_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    payload_bytes: Mapped[int] = mapped_column(BigInteger)
    num_updates: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime]


class PersonalizedModel(Base):
    """One version of a device's final model for a task. A result with other files than the newest
    version's is a new version (1, 2, ...); the same files again are the same version."""

    __tablename__ = "personalized_models"
    __table_args__ = (
        UniqueConstraint("task_pk", "device_pk", "version"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    mask_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    weights_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    tflite_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    accuracy: Mapped[float] = mapped_column(Double)
    latency_ms: Mapped[float] = mapped_column(Double)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    peak_rss_bytes: Mapped[int] = mapped_column(BigInteger)
    num_test: Mapped[int | None] = mapped_column(Integer)  # test samples the accuracy is over
    density: Mapped[float | None] = mapped_column(Double)  # kept share of the masked weights (1: dense)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime]


class MaskBase(Base):
    """A device's last accepted mask per body entry: what its next update may be coded against
    (``protocol.mask_coding``). Kept here so the aggregator decodes delta-coded masks after a restart.

    The bits are either in the row (``bits``) or in the stored update they came in (``payload_sha256``,
    an update payload in full coding): the ingest path writes the reference, so the mask is not
    written twice."""

    __tablename__ = "mask_bases"
    __table_args__ = (
        UniqueConstraint("task_pk", "device_pk", "entry"),
        CheckConstraint("(bits IS NULL) <> (payload_sha256 IS NULL)", name="bits_or_payload"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    entry: Mapped[str] = mapped_column(String(256))
    round_no: Mapped[int] = mapped_column(Integer)
    num_bits: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(16))  # hex of protocol.mask_coding.mask_digest
    bits: Mapped[bytes | None] = mapped_column(LargeBinary)  # packed (little bit order), zlib
    payload_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    updated_at: Mapped[dt.datetime]
