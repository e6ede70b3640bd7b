"""What the store hands back: plain, immutable dataclasses, detached from any database session."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

ExportFormat = Literal["tflite", "torch", "mask"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("tflite", "torch", "mask")
ModelOrder = Literal["accuracy", "latency_ms", "size_bytes", "density", "num_test", "created_at"]
MODEL_ORDERS: tuple[ModelOrder, ...] = (
    "accuracy",
    "latency_ms",
    "size_bytes",
    "density",
    "num_test",
    "created_at",
)


@dataclass(frozen=True)
class StoredUpdate:
    """An accepted update as the aggregator needs it to rebuild a round; ``payload`` is integrity-checked."""

    device_id: str
    base_round: int
    staleness: int
    weight: float
    num_samples: int
    payload: bytes = field(repr=False)
    metrics: dict[str, Any]
    received_at: dt.datetime


@dataclass(frozen=True)
class RoundInfo:
    """A round's state; ``participants`` are the devices whose updates were accepted, in arrival order."""

    round_no: int
    state: Literal["open", "closed"]
    quorum: int
    deadline: dt.datetime
    opened_at: dt.datetime
    closed_at: dt.datetime | None
    closed_by: str | None
    participants: list[str]
    task_id: str


@dataclass(frozen=True)
class DeviceInfo:
    fleet: str
    device_id: str
    presence: str | None
    presence_at: dt.datetime | None
    first_seen_at: dt.datetime
    last_seen_at: dt.datetime
    updates: int  # accepted updates over all rounds
    capabilities: dict[str, Any] | None


@dataclass(frozen=True)
class RoundSummary:
    fleet: str
    task_id: str
    round_no: int
    state: str
    quorum: int
    participants: int
    rejections: int
    payload_bytes: int  # total over the accepted updates
    opened_at: dt.datetime
    deadline: dt.datetime
    closed_at: dt.datetime | None
    closed_by: str | None
    duration_s: float | None  # opening to closing; None while open


@dataclass(frozen=True)
class UpdateSummary:
    """An accepted update's metadata (no payload bytes)."""

    device_id: str
    base_round: int
    staleness: int
    weight: float
    num_samples: int
    payload_bytes: int
    payload_sha256: str
    payload_pruned: bool
    metrics: dict[str, Any]
    received_at: dt.datetime


@dataclass(frozen=True)
class RejectionInfo:
    reason: str
    detail: str
    task_id: str | None
    round_no: int | None
    device_id: str | None
    topic: str | None
    payload_size: int | None
    received_at: dt.datetime


@dataclass(frozen=True)
class AggregateInfo:
    sha256: str
    size_bytes: int
    num_updates: int
    created_at: dt.datetime


@dataclass(frozen=True)
class RoundDetail:
    """One round in full: who sent what, what was refused and why, and what it closed with."""

    fleet: str
    round: RoundInfo
    updates: list[UpdateSummary]
    rejections: list[RejectionInfo]
    aggregate: AggregateInfo | None


@dataclass(frozen=True)
class ModelInfo:
    """One version of a personalized model: its scores and where its files are (blob digests)."""

    fleet: str
    task_id: str
    device_id: str
    version: int
    accuracy: float
    num_test: int | None  # test samples behind the accuracy (None: not reported)
    density: float | None  # kept share of the masked weights (None: not reported)
    latency_ms: float
    size_bytes: int
    peak_rss_bytes: int
    metrics: dict[str, Any]
    created_at: dt.datetime
    tflite_sha256: str
    weights_sha256: str
    mask_sha256: str


@dataclass(frozen=True)
class TaskStatus:
    """Where a task stands: rounds closed of its total, the aggregator's state, who it waits for."""

    fleet: str
    task_id: str
    strategy: str
    state: str | None  # running, finalizing, done, failed (None: stored before task states existed)
    rounds_closed: int
    rounds_total: int | None  # from the schedule (None: not stored)
    open_round: int | None
    participants: int  # devices with an accepted update
    models: int  # participants whose personalized model is stored
    missing: list[str]  # devices the open round or the finalization waits for
    outcome: str | None  # why it failed
    state_at: dt.datetime | None
    created_at: dt.datetime


@dataclass(frozen=True)
class NewUpdate:
    """An accepted update to store (``Store.record_batch``). ``masks``: the device's mask bases that come
    with it, ``(round, {entry: (number of bits, digest hex)})``, stored only if the update is, and as
    references to its payload, which must carry those masks in full coding (see
    ``storage.mask_bases``)."""

    device_id: str
    base_round: int
    staleness: int
    weight: float
    num_samples: int
    payload: bytes = field(repr=False)
    metrics: dict[str, Any]
    masks: tuple[int, dict[str, tuple[int, str]]] | None = field(default=None, repr=False)
    # SHA-256 (hex) of ``payload`` when the caller has it already (the aggregator keys updates by it):
    # not computed twice. Every read checks the stored bytes against it anyway.
    payload_sha256: str | None = None


@dataclass(frozen=True)
class NewRejection:
    """A refused message to record (``Store.record_batch``); see ``Store.record_rejection``."""

    fleet: str
    reason: str
    detail: str
    task_id: str | None = None
    round_no: int | None = None
    device_id: str | None = None
    topic: str | None = None
    payload_size: int | None = None


@dataclass(frozen=True)
class NewPresence:
    """A device seen (``Store.record_batch``), with the rules of ``Store.upsert_device``: ``seen_at``
    (default now) only moves last-seen forward, the presence with the latest ``seen_at`` wins (the later
    one in the batch on a tie), ``capabilities`` replace the stored ones when given."""

    fleet: str
    device_id: str
    presence: str | None = None
    seen_at: dt.datetime | None = None
    capabilities: dict[str, Any] | None = None
