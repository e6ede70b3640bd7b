"""The round manager's pipelined commit (issue 11): while one batch is being written, the next one is
judged against it (a twin is one row, a replay is refused), a failed write drops the batch judged
meanwhile, and the quorum closes a round only once nothing is pending. Real SQLite store."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fixtures.fleet import fedmask_task, mask_update
from sqlalchemy import select

from fedmask.aggregator.round_manager import RoundManager
from fedmask.aggregator.service import AggregatorService, CommitStalled
from fedmask.protocol import messages
from fedmask.protocol.errors import Rejection
from fedmask.protocol.topics import Topics
from fedmask.storage import Store, schema

FLEET = "pipelined"
TASK_ID = "pipelined-task"
TOPICS = Topics(FLEET)


def manager_for(store: Store, quorum: int) -> RoundManager:
    task = fedmask_task(FLEET, 14, task_id=TASK_ID, rounds=2, quorum=quorum, deadline_s=600.0)
    manager = RoundManager(FLEET, task, store)
    manager.start()
    manager.known_devices.update(f"dev-{i}" for i in range(4))
    return manager


def judge(manager: RoundManager, device: str, seed: int):
    """Decode and judge one update of ``device``; returns the decision."""
    (name, shape), *_ = manager.expected.items()
    mask = np.random.default_rng(seed).random(shape) < 0.5
    payload = mask_update(FLEET, TASK_ID, device, mask, entry=name)
    update = messages.decode(payload, messages.Update, fleet=FLEET)
    decision, _ = manager.on_update(device, update, payload, TOPICS.up(device))
    return decision


def stored(store: Store) -> list[str]:
    return sorted(u.device_id for u in store.accepted_updates(TASK_ID, 1))


def test_the_next_batch_is_judged_against_the_committing_one(tmp_path) -> None:
    with Store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.upgrade()
        manager = manager_for(store, quorum=3)
        assert judge(manager, "dev-0", seed=0).accepted
        batch = manager.take()  # being written, without the service's lock
        twin = judge(manager, "dev-0", seed=0)  # the same bytes again: answered, not stored twice
        assert (twin.accepted, twin.detail) == (True, "duplicate delivery")
        replay = judge(manager, "dev-0", seed=1)  # other bytes from the same device: refused
        assert (replay.accepted, replay.reason) == (False, Rejection.REPLAYED_UPDATE.value)
        assert judge(manager, "dev-1", seed=2).accepted
        assert not manager.must_commit()  # 1 committing + 1 pending < quorum 3
        assert manager.settle(batch, manager.write(batch)) == ({}, [])
        assert stored(store) == ["dev-0"]
        manager.commit()
        assert stored(store) == ["dev-0", "dev-1"]
        with store.engine.connect() as connection:
            reasons = connection.scalars(select(schema.Rejection.reason)).all()
        assert reasons == [Rejection.REPLAYED_UPDATE.value]


def test_a_failed_write_drops_what_was_judged_meanwhile(tmp_path) -> None:
    with Store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.upgrade()
        manager = manager_for(store, quorum=3)
        judge(manager, "dev-0", seed=0)
        manager.take()
        assert judge(manager, "dev-0", seed=0).detail == "duplicate delivery"  # counts on the failed one
        manager.abandon()  # the write failed: neither batch is answered, the devices send them again
        assert not manager.pending and manager.committing is None
        assert judge(manager, "dev-0", seed=0).detail == ""  # judged anew: a fresh update
        manager.commit()
        assert stored(store) == ["dev-0"]


def test_the_quorum_closes_the_round_once_nothing_is_pending(tmp_path) -> None:
    with Store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.upgrade()
        manager = manager_for(store, quorum=2)
        judge(manager, "dev-0", seed=0)
        judge(manager, "dev-1", seed=1)
        batch = manager.take()  # (the service takes none that reaches the quorum; this one does)
        judge(manager, "dev-2", seed=2)  # judged meanwhile: an update of round 1 too
        assert manager.must_commit()  # committing and pending reach the quorum: the caller waits
        assert manager.settle(batch, manager.write(batch)) == ({}, [])  # not closed under a pending batch
        assert manager.current is not None and manager.current.number == 1
        assert manager.must_commit()
        _, after = manager.commit()
        assert [o.topic for o in after] == [TOPICS.round]  # round 2's announcement
        assert manager.current is not None and manager.current.number == 2
        assert stored(store) == ["dev-0", "dev-1", "dev-2"]


def test_a_flush_gives_up_on_a_commit_that_never_finishes(tmp_path) -> None:
    """A write waits for the flusher's commit with a deadline, then fails with a clear error."""
    task = fedmask_task(FLEET, 14, task_id=TASK_ID, rounds=2, quorum=2, deadline_s=600.0)
    with Store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.upgrade()
        # Never connected: the flush below gives up before it would touch the broker.
        service = AggregatorService("mqtt://127.0.0.1:1", FLEET, task, store, commit_wait_s=0.3)
        service._committing = True  # as while the flusher writes a batch that hangs
        started = time.monotonic()
        with service._lock, pytest.raises(CommitStalled, match=r"not finished within 0.3 s"):
            service._flush()
        assert 0.25 <= time.monotonic() - started < 5
