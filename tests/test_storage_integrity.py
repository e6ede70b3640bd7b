"""Blob integrity on read, and pruning of old payloads, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import pytest
from sqlalchemy import select, update

from fedmask.storage import BlobIntegrityError, PayloadPrunedError, Store
from fedmask.storage.blobs import put_blob
from fedmask.storage.engine import write_transaction
from fedmask.storage.schema import Blob
from fedmask.storage.types import utcnow

UTC = dt.timezone.utc
FLEET, TASK = "orchard", "orchard-t1"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def corrupt(store: Store, digest: str) -> None:
    """Flip one byte of a stored blob behind the store's back, as a failing disk would."""
    with store.engine.begin() as connection:
        data = bytearray(connection.scalar(select(Blob.data).where(Blob.sha256 == digest)))
        data[len(data) // 2] ^= 0xFF
        connection.execute(update(Blob).where(Blob.sha256 == digest).values(data=bytes(data)))


def run_rounds(
    store: Store, payloads: dict[int, dict[str, bytes]], open_rounds: frozenset[int] = frozenset()
) -> None:
    """Open and fill the given rounds; close every one not listed in ``open_rounds``."""
    for round_no, by_device in payloads.items():
        store.open_round(TASK, round_no, quorum=1, deadline=dt.datetime.now(UTC) + dt.timedelta(hours=1))
        for device, payload in by_device.items():
            fields = {
                "base_round": round_no - 1,
                "staleness": 0,
                "weight": 1.0,
                "num_samples": 1,
                "metrics": {},
            }
            store.record_update(TASK, round_no, device, payload=payload, **fields)
        if round_no not in open_rounds:
            store.close_round(TASK, round_no, aggregate=b"aggregate %d" % round_no, closed_by="deadline")


@pytest.fixture
def task_store(store: Store) -> Store:
    store.register_task(FLEET, TASK, spec={}, seed=3, weights_digest="d" * 64, strategy="fedmask", arch="mlp")
    return store


def test_corrupt_update_payload_is_reported_by_name(task_store: Store) -> None:
    good, bad = os.urandom(4096), os.urandom(4096)
    run_rounds(task_store, {1: {"pi-1": good, "pi-2": bad}}, open_rounds=frozenset({1}))
    corrupt(task_store, sha(bad))
    with pytest.raises(BlobIntegrityError) as caught:
        task_store.accepted_updates(TASK, 1)
    error = caught.value
    assert error.sha256 == sha(bad) and error.actual != sha(bad)
    assert sha(bad) in str(error) and "device 'pi-2'" in str(error) and "round 1" in str(error)


def test_corrupt_aggregate_and_model_files_are_reported_by_name(task_store: Store) -> None:
    run_rounds(task_store, {1: {"pi-1": b"u"}})
    corrupt(task_store, sha(b"aggregate 1"))
    with pytest.raises(BlobIntegrityError, match=rf"blob {sha(b'aggregate 1')} \(aggregate of round 1"):
        task_store.get_aggregate(TASK, 1)

    tflite = b"TFL3" + os.urandom(256)
    scores = {
        "accuracy": 0.9,
        "latency_ms": 1.0,
        "size_bytes": len(tflite),
        "peak_rss_bytes": 1,
        "metrics": {},
    }
    task_store.save_personalized_model(
        TASK, "pi-1", mask=b"mask", weights=b"weights", tflite=tflite, **scores
    )
    corrupt(task_store, sha(tflite))
    with pytest.raises(BlobIntegrityError, match=rf"blob {sha(tflite)} \(tflite file of device 'pi-1'"):
        task_store.export_model("pi-1", "tflite")
    assert task_store.export_model("pi-1", "mask") == b"mask"  # the other files are intact


def test_prune_keeps_the_last_rounds_payloads_and_all_metadata(task_store: Store) -> None:
    payloads = {n: {f"pi-{d}": os.urandom(1024) for d in range(3)} for n in range(1, 6)}
    run_rounds(task_store, payloads, open_rounds=frozenset({5}))
    before = task_store.list_rounds(task_id=TASK)

    freed = task_store.prune(keep_last=2)

    old_rounds = [1, 2, 3]  # rounds 4 and 5 are the newest two
    assert freed == sum(len(payloads[n]) for n in old_rounds)
    assert task_store.list_rounds(task_id=TASK) == before  # counts, bytes and timing unchanged
    for n in old_rounds:
        detail = task_store.round_detail(TASK, n)
        assert all(u.payload_pruned for u in detail.updates)
        assert {u.device_id: u.payload_sha256 for u in detail.updates} == {
            d: sha(p) for d, p in payloads[n].items()
        }
        assert task_store.get_aggregate(TASK, n) == b"aggregate %d" % n  # aggregates are never pruned
    with pytest.raises(PayloadPrunedError, match=r"blob [0-9a-f]{64} \(update of device 'pi-0', round 1"):
        task_store.accepted_updates(TASK, 1)
    for n in (4, 5):
        assert {u.device_id: u.payload for u in task_store.accepted_updates(TASK, n)} == payloads[n]
    assert task_store.prune(keep_last=2) == 0


def test_prune_never_frees_an_open_round_or_a_shared_payload(task_store: Store) -> None:
    shared = os.urandom(512)
    payloads = {
        1: {"pi-1": os.urandom(512)},
        2: {"pi-1": shared},
        3: {"pi-1": os.urandom(512)},
        4: {"pi-2": shared},
    }
    run_rounds(task_store, payloads, open_rounds=frozenset({1}))

    assert task_store.prune(keep_last=1) == 1  # only round 3's payload: 1 is open, 2 shares bytes with 4

    assert task_store.accepted_updates(TASK, 1)[0].payload == payloads[1]["pi-1"]
    assert task_store.accepted_updates(TASK, 2)[0].payload == shared
    with pytest.raises(PayloadPrunedError):
        task_store.accepted_updates(TASK, 3)


def test_prune_deletes_blobs_nothing_refers_to_and_keeps_every_model_version(task_store: Store) -> None:
    first = {"mask": b"m1", "weights": b"w1", "tflite": b"t1"}
    second = {"mask": b"m2", "weights": b"w2", "tflite": b"t2"}
    for files in (first, second):
        task_store.save_personalized_model(
            TASK, "pi-1", accuracy=0.5, latency_ms=1.0, size_bytes=2, peak_rss_bytes=1, metrics={}, **files
        )
    with write_transaction(task_store.engine) as connection:  # bytes left behind by nobody
        put_blob(connection, b"orphan", utcnow())
    assert task_store.prune(keep_last=0) == 1
    assert task_store.export_model("pi-1", "torch") == second["weights"]
    assert task_store.export_model("pi-1", "torch", version=1) == first["weights"]


def test_a_pruned_payload_comes_back_when_the_same_bytes_are_stored_again(task_store: Store) -> None:
    payload = os.urandom(2048)
    run_rounds(task_store, {1: {"pi-1": payload}, 2: {"pi-1": os.urandom(16)}})
    assert task_store.prune(keep_last=1) == 1
    run_rounds(task_store, {3: {"pi-9": payload}}, open_rounds=frozenset({3}))
    assert task_store.accepted_updates(TASK, 1)[0].payload == payload


def test_prune_refuses_a_negative_count(task_store: Store) -> None:
    with pytest.raises(ValueError, match="keep_last: -1 is outside"):
        task_store.prune(keep_last=-1)
