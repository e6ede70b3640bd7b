"""The SQL store: fleets, devices, rounds, updates and personalized models on SQLite or PostgreSQL.

``from fedmask.storage import Store`` is the whole API; see ``docs/storage.md``. ``Store`` (and with it
SQLAlchemy) is imported on first use, so ``fedmask.storage.cli`` stays cheap to import for ``fedmask --help``.
"""

from typing import TYPE_CHECKING, Any

from fedmask.storage.errors import BlobIntegrityError, PayloadPrunedError, RoundClosedError, StorageError
from fedmask.storage.records import (
    AggregateInfo,
    DeviceInfo,
    ModelInfo,
    NewPresence,
    NewRejection,
    NewUpdate,
    RejectionInfo,
    RoundDetail,
    RoundInfo,
    RoundSummary,
    StoredUpdate,
    UpdateSummary,
)

if TYPE_CHECKING:
    from fedmask.storage.store import Store

__all__ = [
    "AggregateInfo",
    "BlobIntegrityError",
    "DeviceInfo",
    "ModelInfo",
    "NewPresence",
    "NewRejection",
    "NewUpdate",
    "PayloadPrunedError",
    "RejectionInfo",
    "RoundClosedError",
    "RoundDetail",
    "RoundInfo",
    "RoundSummary",
    "StorageError",
    "Store",
    "StoredUpdate",
    "UpdateSummary",
]


def __getattr__(name: str) -> Any:
    if name == "Store":
        from fedmask.storage.store import Store

        return Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
