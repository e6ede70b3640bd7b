"""Exceptions the store raises. Every message names the record or blob involved and what was expected."""

from __future__ import annotations


class StorageError(RuntimeError):
    """The store cannot do what was asked: a missing record, a schema that is not at head, bad input."""


class BlobIntegrityError(StorageError):
    """A stored blob whose bytes no longer hash to the SHA-256 it is addressed by."""

    def __init__(self, sha256: str, actual: str, owner: str) -> None:
        self.sha256 = sha256
        self.actual = actual
        self.owner = owner
        super().__init__(
            f"blob {sha256} ({owner}) is corrupt: its stored bytes hash to {actual}, "
            "not to the SHA-256 it is addressed by"
        )


class PayloadPrunedError(StorageError):
    """The bytes of a blob were released by `fedmask db prune`; only its metadata remains."""

    def __init__(self, sha256: str, owner: str) -> None:
        self.sha256 = sha256
        self.owner = owner
        super().__init__(f"blob {sha256} ({owner}) was pruned: its metadata is kept but its bytes are gone")


class RoundClosedError(StorageError):
    """An update arrived for a round that is already closed; the aggregate no longer changes."""
