"""A small per-process cache of parsed data, keyed by the content of the source files.

Keying by content (a SHA-1 over the bytes) rather than by modification time means a file rewritten
within the file system's timestamp granularity is never served stale. Hashing costs a fraction of
parsing (about 40 ms for Fashion-MNIST's 26 MB of gzip against about 300 ms to inflate and decode it).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def content_key(parts: Iterable[tuple[str, bytes]]) -> bytes:
    """A digest of named byte strings (names matter: a renamed file is a different input)."""
    digest = hashlib.sha1(usedforsecurity=False)
    for name, data in parts:
        for chunk in (name.encode(), data):
            digest.update(len(chunk).to_bytes(8, "little"))
            digest.update(chunk)
    return digest.digest()


class ParseCache(Generic[T]):
    """Least-recently-used results of ``parse``, at most ``max_items`` of them."""

    def __init__(self, max_items: int = 4) -> None:
        self._items: OrderedDict[bytes, T] = OrderedDict()
        self._max_items = max_items
        self._lock = threading.Lock()

    def get_or_parse(self, key: bytes, parse: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = parse()  # outside the lock: parsing may take a while and may raise
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._max_items:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
