"""Content-addressed bytes: stored once per SHA-256, checked against it on every read."""

from __future__ import annotations

import datetime as dt
import hashlib

from sqlalchemy import Connection, select

from fedmask.storage.errors import BlobIntegrityError, PayloadPrunedError, StorageError
from fedmask.storage.schema import Blob
from fedmask.storage.statements import hot_statements


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(connection: Connection, data: bytes, now: dt.datetime) -> str:
    """Store ``data`` unless an identical blob is there already; return its SHA-256.

    The upsert is safe with concurrent writers: the unique key decides, nobody reads-then-writes. A blob
    whose bytes were pruned gets them back.
    """
    digest = sha256_hex(data)
    connection.execute(
        hot_statements(connection.dialect.name).put_blob,
        {"sha256": digest, "size_bytes": len(data), "data": data, "created_at": now},
    )
    return digest


def verified(sha256: str, data: bytes | None, owner: str) -> bytes:
    """``data`` if it hashes to ``sha256``; otherwise a clear error naming the blob and its owner."""
    if data is None:
        raise PayloadPrunedError(sha256, owner)
    data = bytes(data)  # psycopg returns memoryview for bytea
    actual = sha256_hex(data)
    if actual != sha256:
        raise BlobIntegrityError(sha256, actual, owner)
    return data


def read_blob(connection: Connection, sha256: str, owner: str) -> bytes:
    """The bytes of blob ``sha256``, integrity-checked; ``owner`` says what they belong to, for errors."""
    row = connection.execute(select(Blob.data).where(Blob.sha256 == sha256)).one_or_none()
    if row is None:
        raise StorageError(f"blob {sha256} ({owner}) is missing from the blobs table")
    return verified(sha256, row.data, owner)
