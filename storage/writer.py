"""``Store.record_batch`` in a process of its own: the aggregator's group commit off its interpreter lock.

The aggregator's three busy threads (paho's network loop, the MQTT handler judging updates, the flusher
writing batches) share one interpreter lock, and the batch's SQL is about a third of what they hold it
for. A :class:`WriterProcess` runs that SQL in a child process with its own store connection; the
flusher only pickles the batch down a pipe and waits for the answer, so judging, receiving and writing
use both cores (``docs/capacity.md``, "Store writer process").

Semantics are the store's: one transaction per call, all or nothing, the same result list, the same
``RoundClosedError``. A child that dies or hangs fails the call (``StorageError``), exactly like a
database that fails a commit: the aggregator then acks the batch without answering it and the devices
republish. The next call starts a new child. The child exits when the parent does (its pipe closes).
It is a spawned interpreter: a script of one's own that starts the aggregator service must guard its
entry point (``if __name__ == "__main__":``), as for any ``multiprocessing`` child; ``fedmask`` does.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection

from fedmask.storage.errors import RoundClosedError, StorageError
from fedmask.storage.records import NewPresence, NewRejection, NewUpdate

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a fresh interpreter importing SQLAlchemy and opening the store
_RAISED = {"RoundClosedError": RoundClosedError, "StorageError": StorageError}


class WriterProcess:
    """A child process that owns a :class:`~fedmask.storage.store.Store` on ``url`` and runs
    ``record_batch`` for its parent, one call at a time, each answered within ``timeout_s``."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL", timeout_s: float = 60.0) -> None:
        self._url = url
        self._synchronous = sqlite_synchronous
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs (its CPU is the aggregator's too)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> WriterProcess:
        """Start the child and wait until its store is open (``StorageError`` if it cannot)."""
        with self._lock:
            self._start()
        return self

    def record_batch(
        self,
        task_id: str | None,
        round_no: int | None,
        updates: Sequence[NewUpdate] = (),
        rejections: Sequence[NewRejection] = (),
        *,
        presences: Sequence[NewPresence] = (),
    ) -> list[bool]:
        """As ``Store.record_batch``, in the child."""
        request = (task_id, round_no, list(updates), list(rejections), list(presences))
        with self._lock:
            if self._conn is None:
                self._start()
            assert self._conn is not None
            try:
                self._conn.send(request)
                if not self._conn.poll(self.timeout_s):
                    self._stop(kill=True)
                    raise StorageError(f"the store writer process did not answer within {self.timeout_s:g} s")
                answer = self._conn.recv()
            except (EOFError, OSError) as exc:
                code = self._process.exitcode if self._process is not None else None
                self._stop(kill=True)
                raise StorageError(f"the store writer process exited (exit code {code})") from exc
        if answer[0] == "ok":
            return answer[1]
        _, kind, message = answer
        raise _RAISED.get(kind, StorageError)(message if kind in _RAISED else f"{kind}: {message}")

    def close(self) -> None:
        with self._lock:
            self._stop(kill=False)

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(self._url, self._synchronous, theirs),
            name="fedmask-store-writer",
            daemon=True,
        )
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        try:
            if not ours.poll(START_TIMEOUT_S):
                raise StorageError(f"the store writer process did not start within {START_TIMEOUT_S:g} s")
            ready = ours.recv()
        except (EOFError, OSError) as exc:
            self._stop(kill=True)
            raise StorageError(
                f"the store writer process exited at start (exit code {process.exitcode})"
            ) from exc
        except StorageError:
            self._stop(kill=True)
            raise
        if ready != "ready":
            self._stop(kill=True)
            raise StorageError(f"the store writer process could not open the store: {ready[2]}")
        logger.info("store writer process %d serving", process.pid)

    def _stop(self, *, kill: bool) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()  # the child reads end-of-file and exits
        if process is not None:
            if kill:
                process.kill()
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)


def _serve(url: str, synchronous: str, conn: Connection) -> None:
    """The child: open the store, then answer requests until the parent closes the pipe."""
    from fedmask.heap import settle_for_service
    from fedmask.storage.store import Store

    try:
        store = Store(url, sqlite_synchronous=synchronous)
        with store.engine.connect():  # reachable now, not at the first batch
            pass
    except Exception as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    settle_for_service()
    conn.send("ready")
    with store:
        while True:
            try:
                task_id, round_no, updates, rejections, presences = conn.recv()
            except (EOFError, OSError):
                return
            try:
                answer = (
                    "ok",
                    store.record_batch(task_id, round_no, updates, rejections, presences=presences),
                )
            except Exception as exc:
                answer = ("error", type(exc).__name__, str(exc))
            try:
                conn.send(answer)
            except (EOFError, OSError):
                return
