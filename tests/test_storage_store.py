"""The write path and resume reads the aggregator relies on, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from fedmask.storage import NewPresence, NewUpdate, RoundClosedError, StorageError, Store
from fedmask.storage.schema import Blob, Device, Update

UTC = dt.timezone.utc
FLEET, TASK = "greenhouse", "har-mask-1"


def add_task(store: Store, task_id: str = TASK, fleet: str = FLEET, seed: int = 42) -> None:
    store.register_task(
        fleet,
        task_id,
        spec={"dataset": "hmp", "rounds": 3, "lr": 0.1},
        seed=seed,
        weights_digest="sha256:" + "ab" * 32,
        strategy="fedmask",
        arch="har-cnn",
    )


def in_minutes(minutes: float) -> dt.datetime:
    return dt.datetime.now(UTC) + dt.timedelta(minutes=minutes)


def send(store: Store, device: str, payload: bytes, round_no: int = 1, **overrides: object) -> bool:
    fields: dict = {
        "base_round": 0,
        "staleness": 0,
        "weight": 1.0,
        "num_samples": 32,
        "metrics": {"loss": 0.7},
    }
    fields.update(overrides)
    return store.record_update(TASK, round_no, device, payload=payload, **fields)


def save_model(store: Store, device: str = "pi-01", task_id: str = TASK, **overrides: object) -> None:
    fields: dict = {"mask": b"m", "weights": b"w", "tflite": b"t", "accuracy": 0.5, "latency_ms": 1.0}
    fields.update(size_bytes=5, peak_rss_bytes=1, metrics={})
    fields.update(overrides)
    store.save_personalized_model(task_id, device, **fields)


def count(store: Store, column: object) -> int:
    with store.engine.connect() as connection:
        return connection.scalar(select(func.count(column)))


@pytest.fixture
def ready(store: Store) -> Store:
    add_task(store)
    store.open_round(TASK, 1, quorum=2, deadline=in_minutes(5))
    return store


def test_update_round_trips_with_its_payload_and_metadata(ready: Store) -> None:
    payload = os.urandom(100 * 1024)
    assert send(
        ready, "pi-01", payload, base_round=0, staleness=1, weight=0.5, num_samples=77, metrics={"acc": 0.8}
    )
    (stored,) = ready.accepted_updates(TASK, 1)
    assert stored.payload == payload
    assert (stored.device_id, stored.base_round, stored.staleness) == ("pi-01", 0, 1)
    assert (stored.weight, stored.num_samples, stored.metrics) == (0.5, 77, {"acc": 0.8})
    assert stored.received_at.tzinfo == UTC
    assert abs(stored.received_at - dt.datetime.now(UTC)) < dt.timedelta(minutes=1)


def test_redelivered_update_returns_false_and_changes_nothing(ready: Store) -> None:
    first = b"first delivery"
    assert send(ready, "pi-01", first, metrics={"loss": 0.7})
    blobs_before = count(ready, Blob.sha256)
    assert not send(ready, "pi-01", b"different bytes, same (task, round, device)", metrics={"loss": 9.9})
    (stored,) = ready.accepted_updates(TASK, 1)
    assert (stored.payload, stored.metrics) == (first, {"loss": 0.7})
    assert count(ready, Blob.sha256) == blobs_before
    assert count(ready, Update.id) == 1


def test_identical_payloads_are_stored_once(ready: Store) -> None:
    same = b"\x00" * 4096
    assert send(ready, "pi-01", same)
    assert send(ready, "pi-02", same)
    assert count(ready, Blob.sha256) == 1
    assert [u.payload for u in ready.accepted_updates(TASK, 1)] == [same, same]


def test_update_registers_an_unknown_device_and_moves_last_seen(ready: Store) -> None:
    long_ago = dt.datetime(2020, 1, 1, tzinfo=UTC)
    ready.upsert_device(FLEET, "pi-01", presence="online", seen_at=long_ago)
    assert send(ready, "pi-01", b"a")
    assert send(ready, "pi-new", b"b")
    devices = {d.device_id: d for d in ready.list_devices(FLEET)}
    assert set(devices) == {"pi-01", "pi-new"}
    assert devices["pi-01"].first_seen_at == long_ago
    assert devices["pi-01"].last_seen_at > long_ago
    assert devices["pi-new"].updates == 1


def test_update_needs_an_open_round_of_a_known_task(ready: Store) -> None:
    with pytest.raises(StorageError, match=r"unknown task 'nope'"):
        ready.record_update(
            "nope", 1, "pi-01", base_round=0, staleness=0, weight=1, num_samples=1, payload=b"", metrics={}
        )
    with pytest.raises(StorageError, match=r"no round 7"):
        send(ready, "pi-01", b"x", round_no=7)
    assert send(ready, "pi-01", b"x")
    ready.close_round(TASK, 1, aggregate=b"agg", closed_by="quorum")
    # A redelivery after closing is still just a duplicate; a new device is refused.
    assert not send(ready, "pi-01", b"x")
    with pytest.raises(RoundClosedError, match=r"round 1 of task 'har-mask-1' is closed"):
        send(ready, "pi-02", b"y")
    assert ready.get_round(TASK, 1).participants == ["pi-01"]


def test_close_round_is_idempotent_and_keeps_the_first_aggregate(ready: Store) -> None:
    assert send(ready, "pi-01", b"u1")
    assert send(ready, "pi-02", b"u2")
    assert ready.get_aggregate(TASK, 1) is None
    ready.close_round(TASK, 1, aggregate=b"global-1", closed_by="quorum")
    ready.close_round(TASK, 1, aggregate=b"global-1", closed_by="quorum")
    ready.close_round(TASK, 1, aggregate=b"a late competing aggregate", closed_by="deadline")
    info = ready.get_round(TASK, 1)
    assert (info.state, info.closed_by, info.participants) == ("closed", "quorum", ["pi-01", "pi-02"])
    assert info.closed_at is not None and info.closed_at >= info.opened_at
    assert ready.get_aggregate(TASK, 1) == b"global-1"
    assert ready.round_detail(TASK, 1).aggregate.num_updates == 2
    with pytest.raises(ValueError, match="closed_by"):
        ready.close_round(TASK, 1, aggregate=b"x", closed_by="manual")  # type: ignore[arg-type]


def test_open_round_is_idempotent_and_keeps_the_first_settings(ready: Store) -> None:
    first = ready.get_round(TASK, 1)
    ready.open_round(TASK, 1, quorum=9, deadline=in_minutes(60))
    again = ready.get_round(TASK, 1)
    assert (again.quorum, again.deadline, again.opened_at) == (first.quorum, first.deadline, first.opened_at)


def test_a_restarted_aggregator_rebuilds_the_open_round(store_url: str, ready: Store) -> None:
    payloads = {f"pi-{i:02d}": os.urandom(2048) for i in range(5)}
    for device, payload in payloads.items():
        assert send(ready, device, payload)
    ready.close_round(TASK, 1, aggregate=b"g1", closed_by="deadline")
    deadline = in_minutes(10)
    ready.open_round(TASK, 2, quorum=3, deadline=deadline)
    assert send(ready, "pi-03", payloads["pi-03"] + b"r2", round_no=2, base_round=1)
    ready.close()

    with Store(store_url) as restarted:  # a new process would see exactly this
        latest = restarted.latest_round(TASK)
        assert (latest.round_no, latest.state, latest.quorum, latest.participants) == (
            2,
            "open",
            3,
            ["pi-03"],
        )
        assert latest.deadline == deadline
        assert [r.round_no for r in restarted.open_rounds(TASK)] == [2]
        (resumed,) = restarted.accepted_updates(TASK, 2)
        assert resumed.payload == payloads["pi-03"] + b"r2"
        assert not send(restarted, "pi-03", b"redelivered after restart", round_no=2)
        assert {u.device_id: u.payload for u in restarted.accepted_updates(TASK, 1)} == payloads
        assert restarted.get_aggregate(TASK, 1) == b"g1"


def test_register_task_is_idempotent_but_refuses_a_changed_task(store: Store) -> None:
    add_task(store)
    add_task(store)
    with pytest.raises(StorageError, match=r"'har-mask-1' is already registered with a different seed"):
        add_task(store, seed=43)
    with pytest.raises(StorageError, match="different fleet"):
        add_task(store, fleet="another-fleet")
    with pytest.raises(StorageError, match="unknown fleet 'another-fleet'"):
        store.list_devices("another-fleet")  # the refused registration left nothing behind


def test_upsert_device_keeps_the_newest_observation(store: Store) -> None:
    t0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    store.upsert_device(FLEET, "jetson-1", capabilities={"ram_mb": 4096}, presence="online", seen_at=t0)
    later = t0 + dt.timedelta(minutes=5)
    store.upsert_device(FLEET, "jetson-1", presence="offline", seen_at=later)
    # An older presence message delivered late must not win, nor move last-seen back.
    store.upsert_device(FLEET, "jetson-1", presence="online", seen_at=t0 + dt.timedelta(minutes=1))
    (device,) = store.list_devices(FLEET)
    assert (device.presence, device.presence_at) == ("offline", later)
    assert (device.first_seen_at, device.last_seen_at) == (t0, later)
    assert device.capabilities == {"ram_mb": 4096}  # not given again, so kept
    store.upsert_device(FLEET, "jetson-1", capabilities={"ram_mb": 8192})
    assert store.list_devices(FLEET)[0].capabilities == {"ram_mb": 8192}


def seen(device: str, presence: str | None, at: dt.datetime, **capabilities: object) -> NewPresence:
    return NewPresence(FLEET, device, presence=presence, seen_at=at, capabilities=capabilities or None)


def test_record_batch_presences_keep_the_newest_observation(store: Store) -> None:
    """The rules of upsert_device, within one batch (merged) and across batches (in SQL)."""
    add_task(store)
    t0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    minutes = [t0 + dt.timedelta(minutes=m) for m in range(10)]
    store.record_batch(
        None,
        None,
        presences=[
            seen("a", "online", minutes[5], ram_mb=4096),
            seen("a", "offline", minutes[2]),  # older, delivered later: must not win
            seen("b", "online", minutes[3]),
            seen("b", "offline", minutes[3]),  # a tie: the later one wins
            seen("c", "offline", minutes[4]),
            seen("c", "online", minutes[6], ram_mb=1),
        ],
    )
    devices = {d.device_id: d for d in store.list_devices(FLEET)}
    assert (devices["a"].presence, devices["a"].presence_at) == ("online", minutes[5])
    assert (devices["a"].first_seen_at, devices["a"].last_seen_at) == (minutes[2], minutes[5])
    assert devices["a"].capabilities == {"ram_mb": 4096}
    assert (devices["b"].presence, devices["b"].presence_at) == ("offline", minutes[3])
    assert (devices["c"].presence, devices["c"].capabilities) == ("online", {"ram_mb": 1})
    store.record_batch(
        None,
        None,
        presences=[
            seen("a", "offline", minutes[4]),  # older than the stored one: last-seen and presence stay
            seen("b", "online", minutes[1], ram_mb=2),  # older, but capabilities given replace
            seen("c", "offline", minutes[9]),  # newer: wins, capabilities not given stay
            seen("d", None, minutes[7]),  # seen without a presence
        ],
    )
    devices = {d.device_id: d for d in store.list_devices(FLEET)}
    assert (devices["a"].presence, devices["a"].presence_at, devices["a"].last_seen_at) == (
        "online",
        minutes[5],
        minutes[5],
    )
    assert (devices["b"].presence, devices["b"].presence_at) == ("offline", minutes[3])
    assert (devices["b"].first_seen_at, devices["b"].capabilities) == (minutes[1], {"ram_mb": 2})
    assert (devices["c"].presence, devices["c"].presence_at) == ("offline", minutes[9])
    assert devices["c"].capabilities == {"ram_mb": 1}
    assert (devices["d"].presence, devices["d"].presence_at, devices["d"].last_seen_at) == (
        None,
        None,
        minutes[7],
    )


def new_update(device: str, payload: bytes) -> NewUpdate:
    return NewUpdate(device, 0, 0, 1.0, 32, payload, {"loss": 0.5})


def test_record_batch_writes_presences_before_updates(ready: Store) -> None:
    """A device first seen in a batch has its row (and its presence) for its update in the same batch."""
    at = dt.datetime.now(UTC) - dt.timedelta(minutes=1)
    created = ready.record_batch(
        TASK, 1, [new_update("fresh", b"u")], presences=[seen("fresh", "online", at, ram_mb=512)]
    )
    assert created == [True]
    (device,) = ready.list_devices(FLEET)
    assert (device.device_id, device.presence, device.presence_at, device.updates) == (
        "fresh",
        "online",
        at,
        1,
    )
    assert device.capabilities == {"ram_mb": 512}
    assert device.last_seen_at > at  # the update moved it on


def test_a_rolled_back_batch_leaves_no_stale_device_id(ready: Store) -> None:
    """A device row created by a batch that rolls back is not remembered: its id may be reused (SQLite
    hands the next row the same id), and an update must never be filed under another device."""
    ready.close_round(TASK, 1, aggregate=b"agg", closed_by="quorum")
    with pytest.raises(RoundClosedError):
        ready.record_batch(
            TASK, 1, [new_update("ghost", b"g")], presences=[seen("ghost", "online", dt.datetime.now(UTC))]
        )
    assert ready.list_devices(FLEET) == []
    ready.upsert_device(FLEET, "other", presence="online")  # may get the id the ghost had
    ready.open_round(TASK, 2, quorum=2, deadline=in_minutes(5))
    assert ready.record_batch(TASK, 2, [new_update("ghost", b"g")]) == [True]
    assert [u.device_id for u in ready.accepted_updates(TASK, 2)] == ["ghost"]
    assert {d.device_id: d.updates for d in ready.list_devices(FLEET)} == {"ghost": 1, "other": 0}


def test_datetimes_must_be_timezone_aware_and_come_back_in_utc(ready: Store) -> None:
    with pytest.raises(ValueError, match=r"deadline: naive datetime"):
        ready.open_round(TASK, 2, quorum=1, deadline=dt.datetime(2030, 1, 1))
    berlin_noon = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    ready.open_round(TASK, 2, quorum=1, deadline=berlin_noon)
    deadline = ready.get_round(TASK, 2).deadline
    assert deadline == berlin_noon and deadline.tzinfo == UTC and deadline.hour == 10


def test_personalized_model_is_replaced_and_exported_byte_identical(ready: Store) -> None:
    def save(tag: bytes, accuracy: float) -> dict[str, bytes]:
        files = {"mask": b"mask" + tag, "weights": b"safetensors" + tag, "tflite": b"TFL3" + os.urandom(64)}
        save_model(ready, accuracy=accuracy, **files)
        return files

    save(b"-v1", 0.80)
    second = save(b"-v2", 0.85)
    (model,) = ready.list_models()
    assert model.accuracy == 0.85
    assert model.tflite_sha256 == hashlib.sha256(second["tflite"]).hexdigest()
    assert ready.export_model("pi-01", "tflite") == second["tflite"]
    assert ready.export_model("pi-01", "torch", task_id=TASK) == second["weights"]
    assert ready.export_model("pi-01", "mask") == second["mask"]
    with pytest.raises(StorageError, match=r"no personalized model stored for device 'pi-99'"):
        ready.export_model("pi-99", "tflite")


def test_export_without_task_picks_the_most_recent_model(ready: Store) -> None:
    add_task(ready, task_id="har-mask-2")
    for task_id, tflite in ((TASK, b"older"), ("har-mask-2", b"newer")):
        save_model(ready, task_id=task_id, tflite=tflite)
    assert ready.export_model("pi-01", "tflite") == b"newer"
    assert ready.export_model("pi-01", "tflite", task_id=TASK) == b"older"


def test_rejections_are_recorded_with_or_without_attribution(ready: Store) -> None:
    ready.record_rejection(
        FLEET, reason="malformed", detail="msgpack: unexpected end of data", topic="fedmask/v1/x"
    )
    ready.record_rejection(
        FLEET,
        reason="bad_checksum",
        detail="x" * 10_000,
        task_id=TASK,
        round_no=1,
        device_id="pi-07",
        payload_size=99,
    )
    # What a hostile message claims must not stop the rejection from being recorded.
    ready.record_rejection(FLEET, reason="wrong_round", detail="", round_no=2**40, payload_size=-5)
    (rejection,) = ready.round_detail(TASK, 1).rejections
    assert (rejection.reason, rejection.device_id, rejection.payload_size) == ("bad_checksum", "pi-07", 99)
    assert 0 < len(rejection.detail) < 10_000  # a hostile message cannot bloat the store
    with ready.engine.connect() as connection:
        unattributed = "SELECT count(*) FROM rejections WHERE task_id IS NULL AND round_no IS NULL"
        assert connection.scalar(text(unattributed)) == 2


@pytest.fixture
def sqlite_ready(sqlite_url: str) -> Iterator[Store]:
    """For checks made before any SQL runs, where the engine makes no difference."""
    with Store(sqlite_url) as store:
        store.upgrade()
        add_task(store)
        store.open_round(TASK, 1, quorum=1, deadline=in_minutes(5))
        yield store


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("weight", float("nan"), "weight: nan is not a finite number"),
        ("num_samples", -1, r"num_samples: -1 is outside"),
        ("base_round", 2**31, r"base_round: 2147483648 is outside \[0, 2147483647\]"),
        ("metrics", {"loss": float("inf")}, "metrics: not storable as JSON"),
        ("metrics", {"arr": object()}, "metrics: not storable as JSON"),
        ("payload", "text, not bytes", "payload: expected bytes, got str"),
    ],
)
def test_bad_update_fields_are_named_in_the_error(
    sqlite_ready: Store, field: str, value: object, message: str
) -> None:
    fields: dict = {
        "base_round": 0,
        "staleness": 0,
        "weight": 1.0,
        "num_samples": 1,
        "payload": b"",
        "metrics": {},
    }
    fields[field] = value
    with pytest.raises((TypeError, ValueError), match=message):
        sqlite_ready.record_update(TASK, 1, "pi-01", **fields)
    assert count(sqlite_ready, Update.id) == 0
    assert count(sqlite_ready, Device.id) == 0


def test_bad_model_scores_are_refused(sqlite_ready: Store) -> None:
    with pytest.raises(ValueError, match=r"accuracy: 85 is not a finite number in \[0.0, 1.0\]"):
        save_model(sqlite_ready, accuracy=85)


def test_unsupported_database_urls_are_refused_clearly() -> None:
    with pytest.raises(StorageError, match=r"unsupported backend 'mysql'"):
        Store("mysql://user@host/db")
    with pytest.raises(StorageError, match="in-memory SQLite"):
        Store("sqlite://")
    with pytest.raises(StorageError, match="not a valid SQLAlchemy URL"):
        Store("not a url")


def test_bare_postgresql_url_uses_psycopg_3() -> None:
    store = Store("postgresql://postgres@127.0.0.1/unused")  # no connection is made until first use
    assert store.url.drivername == "postgresql+psycopg"
    store.close()


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(sqlite_url: str) -> None:
    with Store(sqlite_url) as store:
        store.upgrade()  # migrates with foreign keys off; the pooled connection must get them back
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        with pytest.raises(IntegrityError, match="FOREIGN KEY"), store.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO tasks (task_id, fleet_pk, spec, seed, weights_digest, strategy, "
                    "arch, created_at) VALUES ('t', 999, '{}', 1, 'd', 's', 'a', '2026-01-01')"
                )
            )
