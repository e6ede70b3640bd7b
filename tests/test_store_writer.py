"""The store writer process (``storage.writer``): ``record_batch`` run in a child process answers as the
store does, propagates a closed round, fails a call cleanly when the child dies and starts a new one
for the next call, and leaves no process behind. SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal

import pytest

from fedmask.storage import NewUpdate, RoundClosedError, StorageError, Store
from fedmask.storage.writer import WriterProcess

UTC = dt.timezone.utc
FLEET, TASK = "writer-fleet", "writer-task"


def new_update(device: str, payload: bytes) -> NewUpdate:
    return NewUpdate(
        device, 0, 0, 1.0, 32, payload, {"loss": 0.5}, payload_sha256=hashlib.sha256(payload).hexdigest()
    )


@pytest.fixture
def ready(store: Store) -> Store:
    store.register_task(
        FLEET, TASK, spec={}, seed=1, weights_digest="sha256:" + "cd" * 32, strategy="fedmask", arch="har-cnn"
    )
    store.open_round(TASK, 1, quorum=2, deadline=dt.datetime.now(UTC) + dt.timedelta(minutes=5))
    return store


def test_the_child_writes_what_the_store_would(ready: Store, store_url: str) -> None:
    writer = WriterProcess(store_url, sqlite_synchronous=ready.sqlite_synchronous).start()
    try:
        updates = [new_update(f"pi-{i}", os.urandom(1000)) for i in range(3)]
        assert writer.record_batch(TASK, 1, updates) == [True, True, True]
        assert writer.record_batch(TASK, 1, updates) == [False, False, False]  # idempotent, as the store
        stored = {u.device_id: u.payload for u in ready.accepted_updates(TASK, 1)}
        assert stored == {u.device_id: u.payload for u in updates}
        ready.close_round(TASK, 1, aggregate=b"agg", closed_by="quorum")
        with pytest.raises(RoundClosedError, match="closed"):
            writer.record_batch(TASK, 1, [new_update("pi-9", os.urandom(1000))])
        with pytest.raises(StorageError, match="no round 7"):
            writer.record_batch(TASK, 7, [new_update("pi-9", os.urandom(1000))])
    finally:
        writer.close()


def test_a_dead_child_fails_the_call_and_the_next_call_gets_a_new_one(ready: Store, store_url: str) -> None:
    writer = WriterProcess(store_url).start()
    try:
        first = writer._process
        assert first is not None and first.is_alive()
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        with pytest.raises(StorageError, match="store writer process exited"):
            writer.record_batch(TASK, 1, [new_update("pi-1", b"one")])
        assert ready.accepted_updates(TASK, 1) == []
        assert writer.record_batch(TASK, 1, [new_update("pi-1", b"one")]) == [True]
        assert writer.pid is not None and writer.pid != first.pid
    finally:
        writer.close()
    assert writer.pid is None and not first.is_alive()


def test_a_store_the_child_cannot_open_is_a_clear_error(tmp_path) -> None:
    writer = WriterProcess(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'store.db'}", timeout_s=5)
    with pytest.raises(StorageError, match="store writer process"):
        writer.start()
    assert writer.pid is None


def test_a_service_that_cannot_start_leaves_no_writer_behind(mosquitto, tmp_path) -> None:
    """The writer starts first (a batch must find it serving); a broker that refuses the aggregator
    (no credentials on an authenticating Mosquitto) fails ``start`` and takes the child with it."""
    from fixtures.fleet import fedmask_task

    from fedmask.aggregator.service import AggregatorService
    from fedmask.protocol.transport import TransportError

    with Store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.upgrade()
        task = fedmask_task(FLEET, 14, task_id=TASK, rounds=1, quorum=1, deadline_s=60.0)
        service = AggregatorService(mosquitto.url(), FLEET, task, store)
        assert service.writer is not None  # the default
        with pytest.raises(TransportError, match="Not authorized"):
            service.start()
        assert service.writer.pid is None
