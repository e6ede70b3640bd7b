"""The aggregator's per-device mask bases in the store (table ``mask_bases``, see ``schema.MaskBase``).

Plain functions over a :class:`~fedmask.storage.store.Store`: the aggregator writes a device's masks
in the transaction that stores the update they came in (``Store.record_batch``), and reads them back
after a restart. Those rows hold no bits, only a reference to the update's payload (which carries the
same masks, in full coding): each accepted mask is written once, which halves the bytes the ingest
path writes. The storage layer does not decode payloads; ``aggregator.mask_books`` does.
"""

from __future__ import annotations

import datetime as dt
import logging
import zlib
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, delete, select

from fedmask.storage import validation
from fedmask.storage.blobs import verified
from fedmask.storage.engine import read_transaction, write_transaction
from fedmask.storage.errors import StorageError
from fedmask.storage.schema import Blob, Device, MaskBase, Task
from fedmask.storage.types import utcnow
from fedmask.storage.validation import INT32_MAX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredMask:
    """One stored base: its bits (``packed``), or the update payload they are in (``payload``, checked
    against its SHA-256; None if released or corrupt, which is logged); ``digest`` checks the bits
    either way."""

    entry: str
    round_no: int
    num_bits: int
    digest: str  # hex
    packed: bytes | None  # bit-packed, little bit order
    payload: bytes | None = None
    payload_sha256: str | None = None


def save_masks(
    store, task_id: str, device_id: str, round_no: int, masks: dict[str, tuple[int, str, bytes]]
) -> None:
    """Replace the device's bases with ``masks`` (entry -> (number of bits, digest hex, packed bits))."""
    validation.name(device_id, "device_id")
    validation.integer(round_no, "round_no", minimum=0, maximum=INT32_MAX)
    now = utcnow()
    with write_transaction(store.engine) as connection:
        task = store._task(connection, task_id)
        device_pk = store._device_pk(connection, task.fleet_pk, device_id, now)
        replace_masks(connection, task.pk, {device_pk: (round_no, masks, None)}, now)


def replace_masks(
    connection: Connection,
    task_pk: int,
    masks: dict[int, tuple[int, dict[str, tuple], str | None]],
    now: dt.datetime,
) -> None:
    """In the caller's transaction: replace the bases of each device (by row id) with its masks
    ``(round, {entry: (bits, digest, packed)}, None)``, or with references to the stored update payload
    that carries them, ``(round, {entry: (bits, digest)}, payload sha256)``; the latter is how
    ``Store.record_batch`` writes them with the updates they came in."""
    connection.execute(
        delete(MaskBase).where(MaskBase.task_pk == task_pk, MaskBase.device_pk.in_(list(masks)))
    )
    rows = [
        {
            "task_pk": task_pk,
            "device_pk": device_pk,
            "entry": entry,
            "round_no": round_no,
            "num_bits": row[0],
            "digest": row[1],
            "bits": None if payload_sha256 is not None else _compress(row[2]),
            "payload_sha256": payload_sha256,
            "updated_at": now,
        }
        for device_pk, (round_no, entries, payload_sha256) in masks.items()
        for entry, row in entries.items()
    ]
    if rows:
        connection.execute(MaskBase.__table__.insert(), rows)


def _compress(packed: bytes) -> bytes:
    """zlib, working only where it pays: bits near half density do not compress, and trying costs
    ~0.3 ms per 10 KB mask on the ingest path (level 0 only frames them)."""
    ones = int(np.bitwise_count(np.frombuffer(packed, dtype=np.uint8)).sum(dtype=np.int64))
    density = ones / (8 * len(packed)) if packed else 0.5
    return zlib.compress(packed, 1 if abs(density - 0.5) > 0.3 else 0)


def load_masks(store, task_id: str, device_id: str) -> list[StoredMask]:
    """The device's bases (empty when it has none)."""
    with read_transaction(store.engine) as connection:
        rows = connection.execute(
            select(
                MaskBase.entry,
                MaskBase.round_no,
                MaskBase.num_bits,
                MaskBase.digest,
                MaskBase.bits,
                MaskBase.payload_sha256,
                Blob.data,
            )
            .join(Task, Task.id == MaskBase.task_pk)
            .join(Device, Device.id == MaskBase.device_pk)
            .outerjoin(Blob, Blob.sha256 == MaskBase.payload_sha256)
            .where(Task.task_id == task_id, Device.device_id == device_id)
        ).all()
    out = []
    for row in rows:
        packed = None
        if row.bits is not None:
            try:
                packed = zlib.decompress(row.bits)
            except zlib.error as exc:
                raise StorageError(f"mask base {row.entry!r} of {device_id!r} is corrupt ({exc})") from exc
        payload = None
        if row.payload_sha256 is not None:
            try:
                payload = verified(row.payload_sha256, row.data, f"mask base {row.entry!r} of {device_id!r}")
            except StorageError as exc:  # released or corrupt: no base, the device resends in full
                logger.error("%s", exc)
        out.append(
            StoredMask(
                row.entry,
                row.round_no,
                row.num_bits,
                row.digest,
                packed,
                payload=payload,
                payload_sha256=row.payload_sha256,
            )
        )
    return out
