"""Operator queries over a small two-fleet history, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field

import pytest

from fedmask.storage import StorageError, Store

UTC = dt.timezone.utc

# Who sends in which round of which task; everything asserted below is derived from this.
HISTORY = {
    ("orchard", "orchard-t1"): {1: ["pi-1", "pi-2", "pi-3"], 2: ["pi-2", "pi-3"], 3: ["pi-1"]},
    ("vineyard", "vineyard-t1"): {1: ["jet-1"]},
}
CLOSED_ROUNDS = {("orchard-t1", 1), ("orchard-t1", 2), ("vineyard-t1", 1)}
REJECTED = [("orchard-t1", 2, "pi-9", "unknown_device"), ("orchard-t1", 2, "pi-1", "stale")]
ACCURACY = {("orchard-t1", "pi-1"): 0.91, ("orchard-t1", "pi-2"): 0.62, ("vineyard-t1", "jet-1"): 0.77}


@dataclass
class Recorded:
    payloads: dict[tuple[str, int, str], bytes] = field(default_factory=dict)


@pytest.fixture
def history(store: Store) -> Recorded:
    recorded = Recorded()
    for (fleet, task_id), rounds in HISTORY.items():
        store.register_task(
            fleet, task_id, spec={}, seed=1, weights_digest="d" * 64, strategy="fedmask", arch="har-cnn"
        )
        for round_no, devices in rounds.items():
            store.open_round(
                task_id, round_no, quorum=2, deadline=dt.datetime.now(UTC) + dt.timedelta(hours=1)
            )
            for device in devices:
                payload = os.urandom(1000 + 100 * round_no)
                recorded.payloads[(task_id, round_no, device)] = payload
                store.record_update(
                    task_id,
                    round_no,
                    device,
                    base_round=round_no - 1,
                    staleness=0,
                    weight=1.0,
                    num_samples=10,
                    payload=payload,
                    metrics={"loss": 1.0 / round_no},
                )
            if (task_id, round_no) in CLOSED_ROUNDS:
                store.close_round(task_id, round_no, aggregate=f"agg-{round_no}".encode(), closed_by="quorum")
    for task_id, round_no, device, reason in REJECTED:
        where = {"task_id": task_id, "round_no": round_no, "device_id": device}
        store.record_rejection("orchard", reason=reason, detail=f"{reason} test", **where)
    store.upsert_device("orchard", "pi-1", presence="online", capabilities={"arch": "armv7l"})
    store.upsert_device("orchard", "pi-idle", presence="offline")
    for (task_id, device), accuracy in ACCURACY.items():
        files = {"mask": b"m" + device.encode(), "weights": b"w", "tflite": b"t" + device.encode()}
        scores = {"latency_ms": 2.0, "size_bytes": 100, "peak_rss_bytes": 1 << 20, "metrics": {}}
        store.save_personalized_model(task_id, device, accuracy=accuracy, **files, **scores)
    return recorded


def test_devices_of_a_fleet_with_presence_and_update_counts(store: Store, history: Recorded) -> None:
    devices = {d.device_id: d for d in store.list_devices("orchard")}
    senders = [dev for (_task, _round, dev) in history.payloads if dev.startswith("pi-")]
    assert set(devices) == set(senders) | {"pi-idle"}
    for device_id, info in devices.items():
        assert info.fleet == "orchard"
        assert info.updates == senders.count(device_id)
        assert info.first_seen_at <= info.last_seen_at
    assert (devices["pi-1"].presence, devices["pi-1"].capabilities) == ("online", {"arch": "armv7l"})
    assert devices["pi-idle"].presence == "offline"
    assert devices["pi-2"].presence is None
    assert {d.fleet for d in store.list_devices()} == {"orchard", "vineyard"}
    with pytest.raises(StorageError, match=r"unknown fleet 'meadow'; the store knows 'orchard', 'vineyard'"):
        store.list_devices("meadow")


def test_rounds_with_participation_and_timing(store: Store, history: Recorded) -> None:
    rounds = store.list_rounds()
    assert [(r.task_id, r.round_no) for r in rounds] == [
        (task_id, n) for (_fleet, task_id), by_round in HISTORY.items() for n in sorted(by_round)
    ]
    for r in rounds:
        sent = [k for k in history.payloads if k[:2] == (r.task_id, r.round_no)]
        assert r.participants == len(sent)
        assert r.payload_bytes == sum(len(history.payloads[k]) for k in sent)
        assert type(r.payload_bytes) is int and type(r.participants) is int  # not Decimal on PostgreSQL
        assert r.rejections == sum(1 for t, n, *_ in REJECTED if (t, n) == (r.task_id, r.round_no))
        closed = (r.task_id, r.round_no) in CLOSED_ROUNDS
        assert r.state == ("closed" if closed else "open")
        assert (r.duration_s is not None) == closed
        if closed:
            assert r.duration_s >= 0
    assert {r.task_id for r in store.list_rounds(fleet="vineyard")} == {"vineyard-t1"}
    assert [r.round_no for r in store.list_rounds(task_id="orchard-t1")] == sorted(
        HISTORY[("orchard", "orchard-t1")]
    )
    assert store.list_rounds(fleet="vineyard", task_id="orchard-t1") == []
    with pytest.raises(StorageError, match="unknown task 'nope'"):
        store.list_rounds(task_id="nope")


def test_one_round_in_detail(store: Store, history: Recorded) -> None:
    detail = store.round_detail("orchard-t1", 2)
    assert detail.fleet == "orchard"
    assert detail.round.participants == HISTORY[("orchard", "orchard-t1")][2]
    for update in detail.updates:
        payload = history.payloads[("orchard-t1", 2, update.device_id)]
        assert update.payload_sha256 == hashlib.sha256(payload).hexdigest()
        assert (update.payload_bytes, update.payload_pruned, update.base_round) == (len(payload), False, 1)
    assert [(r.device_id, r.reason) for r in detail.rejections] == [(d, why) for _t, _n, d, why in REJECTED]
    assert detail.aggregate.sha256 == hashlib.sha256(b"agg-2").hexdigest()
    assert detail.aggregate.num_updates == len(detail.updates)
    assert store.round_detail("orchard-t1", 3).aggregate is None
    assert store.round_detail("orchard-t1", 99) is None


def test_models_filtered_by_fleet_task_and_accuracy(store: Store, history: Recorded) -> None:
    models = store.list_models()
    assert [m.accuracy for m in models] == sorted(ACCURACY.values(), reverse=True)
    assert {(m.task_id, m.device_id) for m in store.list_models(fleet="orchard")} == {
        key for key in ACCURACY if key[0] == "orchard-t1"
    }
    threshold = 0.7
    assert {(m.task_id, m.device_id) for m in store.list_models(min_accuracy=threshold)} == {
        key for key, accuracy in ACCURACY.items() if accuracy >= threshold
    }
    assert [m.device_id for m in store.list_models(task_id="vineyard-t1")] == ["jet-1"]
    best = models[0]
    assert store.export_model(best.device_id, "tflite") == b"t" + best.device_id.encode()
