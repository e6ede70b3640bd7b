"""The aggregator's mask bases in the store: a restarted aggregator decodes masks coded against them."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import zlib

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy import update as sa_update

from fedmask.aggregator.mask_books import StoredBases
from fedmask.protocol import messages
from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.mask_bases import DeviceBases, plain
from fedmask.protocol.mask_coding import mask_digest
from fedmask.protocol.tensor_codec import Coded
from fedmask.storage import Store
from fedmask.storage.mask_bases import load_masks, save_masks
from fedmask.storage.migrate import downgrade, upgrade
from fedmask.storage.records import NewUpdate
from fedmask.storage.schema import Blob, MaskBase

TASK = "bases-task"


def registered(url: str) -> Store:
    store = Store(url)
    store.upgrade()
    store.register_task(
        "fleet", TASK, spec={}, seed=0, weights_digest="d", strategy="fedmask", arch="har_cnn"
    )
    store.open_round(TASK, 1, quorum=1, deadline=dt.datetime.now(dt.timezone.utc))
    return store


def update(round_no: int, body) -> messages.Update:
    return messages.Update(
        fleet="fleet",
        task_id=TASK,
        device="dev-1",
        round=round_no,
        base_round=round_no,
        num_samples=1,
        body=body,
    )


def test_saved_masks_replace_the_previous_ones_and_read_back(db_url: str) -> None:
    store = registered(db_url)
    rng = np.random.default_rng(0)
    first = rng.random(1001) < 0.3
    packed = np.packbits(first, bitorder="little").tobytes()
    save_masks(store, TASK, "dev-1", 1, {"mask": (first.size, mask_digest(first).hex(), packed)})
    second = rng.random(1001) < 0.3
    rows = {
        "mask": (second.size, mask_digest(second).hex(), np.packbits(second, bitorder="little").tobytes())
    }
    save_masks(store, TASK, "dev-1", 2, rows)
    (row,) = load_masks(store, TASK, "dev-1")
    assert (row.entry, row.round_no, row.num_bits, row.digest) == ("mask", 2, 1001, mask_digest(second).hex())
    assert load_masks(store, TASK, "dev-2") == []
    store.close()


def test_a_restarted_aggregator_decodes_updates_coded_against_its_stored_bases(db_url: str) -> None:
    store = registered(db_url)
    rng = np.random.default_rng(1)
    device = DeviceBases(("bits", "mctx"))
    mask = rng.random(20_000) < 0.8
    books = StoredBases(store, TASK)
    received = messages.decode(
        messages.encode(update(1, device.uplink({"mask": Coded(mask, "bits")}, 1))),
        messages.Update,
        bases=books.uplink_bases("dev-1"),
    )
    books.accept("dev-1", 1, received.body)
    device.confirm(1)
    store.close()

    store = Store(db_url)  # the aggregator restarts: nothing in memory
    mask = mask ^ (rng.random(mask.size) < 0.02)
    payload = messages.encode(update(2, device.uplink({"mask": Coded(mask, "bits")}, 2)))
    with pytest.raises(ProtocolError) as err:
        messages.decode(payload, messages.Update)  # without the store's bases: a rejection
    assert err.value.reason is Rejection.MISSING_BASE
    decoded = messages.decode(payload, messages.Update, bases=StoredBases(store, TASK).uplink_bases("dev-1"))
    np.testing.assert_array_equal(decoded.body["mask"].array, mask)
    assert decoded.body["mask"].context.prev.round == 1
    store.close()


def _stored_with_its_update(store: Store, books: StoredBases, round_no: int, payload: bytes) -> None:
    """What the aggregator does with an accepted update: its masks go to the store with it, as
    references to its payload (``Store.record_batch``), and become the device's bases."""
    received = messages.decode(payload, messages.Update, bases=books.uplink_bases("dev-1"))
    stored = payload
    if any(
        c.context is not None for c in received.body.values()
    ):  # stored in full coding, as the service does
        stored = messages.encode(dataclasses.replace(received, body=plain(received.body)))
    rows = books.mask_rows(round_no, received.body)
    assert rows is not None
    update_row = NewUpdate(
        "dev-1",
        base_round=round_no,
        staleness=0,
        weight=1.0,
        num_samples=1,
        payload=stored,
        metrics={},
        masks=(rows[0], {entry: row[:2] for entry, row in rows[1].items()}),
    )
    assert store.record_batch(TASK, round_no, [update_row]) == [True]
    books.accept("dev-1", round_no, received.body, stored=True, rows=rows)


def _first_base(store: Store, seed: int, size: int) -> tuple[DeviceBases, np.ndarray, np.random.Generator]:
    """dev-1's first update (a random mask of ``size`` bits) accepted and stored with its base."""
    rng = np.random.default_rng(seed)
    device = DeviceBases(("bits", "mctx"))
    mask = rng.random(size) < 0.6
    payload = messages.encode(update(1, device.uplink({"mask": Coded(mask, "bits")}, 1)))
    _stored_with_its_update(store, StoredBases(store, TASK), 1, payload)
    device.confirm(1)
    return device, mask, rng


def _base_rows(store: Store) -> list[tuple[int, bytes | None, str | None]]:
    with store.engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(select(MaskBase.round_no, MaskBase.bits, MaskBase.payload_sha256))
        ]


def test_bases_stored_with_their_update_point_at_it_survive_restart_and_prune(db_url: str) -> None:
    store = registered(db_url)
    device, mask, rng = _first_base(store, seed=2, size=20_000)
    # The bits are written once: in the update's stored payload, which the base row points at.
    (stored,) = store.accepted_updates(TASK, 1)
    assert _base_rows(store) == [(1, None, hashlib.sha256(stored.payload).hexdigest())]
    store.close_round(TASK, 1, aggregate=b"aggregate 1", closed_by="quorum")
    store.open_round(TASK, 2, quorum=1, deadline=dt.datetime.now(dt.timezone.utc))
    # Round 1 is outside the newest 0 rounds, but a base still needs its payload: nothing is freed.
    assert store.prune(keep_last=0) == 0
    store.close()

    store = Store(db_url)  # the aggregator restarts: nothing in memory
    books = StoredBases(store, TASK)
    mask = mask ^ (rng.random(mask.size) < 0.02)
    second = messages.encode(update(2, device.uplink({"mask": Coded(mask, "bits")}, 2)))
    decoded = messages.decode(second, messages.Update, bases=books.uplink_bases("dev-1"))
    assert decoded.body["mask"].context.prev.round == 1
    np.testing.assert_array_equal(decoded.body["mask"].array, mask)

    # The round-2 update (coded against its base) is stored in full coding and becomes the base.
    _stored_with_its_update(store, books, 2, second)
    (stored,) = store.accepted_updates(TASK, 2)
    assert messages.decode(stored.payload, messages.Update).body["mask"].context is None
    assert _base_rows(store) == [(2, None, hashlib.sha256(stored.payload).hexdigest())]
    # Nothing points at round 1's payload any more: prune releases it.
    assert store.prune(keep_last=0) == 1
    store.close()


def test_a_base_whose_payload_does_not_carry_it_is_dropped_not_used(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reference that does not hold the digest's bits (a bug, or a hand-edited store) is a missing
    base, so the device resends in full; never a wrong base."""
    store = registered(db_url)
    _first_base(store, seed=3, size=5_000)
    with store.engine.begin() as connection:
        connection.execute(sa_update(MaskBase).values(digest="0" * 16))
    with caplog.at_level(logging.WARNING, logger="fedmask.aggregator.mask_books"):
        assert StoredBases(store, TASK).device_masks("dev-1") == {}
    assert "does not match its digest" in caplog.text
    store.close()


def test_a_base_whose_payload_is_corrupt_is_dropped_and_named(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = registered(db_url)
    _first_base(store, seed=5, size=5_000)
    assert StoredBases(store, TASK).device_masks("dev-1") != {}
    ((_, _, sha),) = _base_rows(store)
    with store.engine.begin() as connection:
        connection.execute(sa_update(Blob).where(Blob.sha256 == sha).values(data=b"not the payload"))
    with caplog.at_level(logging.ERROR, logger="fedmask.storage.mask_bases"):
        (row,) = load_masks(store, TASK, "dev-1")
        assert (row.packed, row.payload, row.payload_sha256) == (None, None, sha)
        assert StoredBases(store, TASK).device_masks("dev-1") == {}
    assert f"blob {sha} (mask base 'mask' of 'dev-1') is corrupt" in caplog.text
    store.close()


def test_migration_0005_keeps_stored_bits_and_its_downgrade_drops_references(sqlite_url: str) -> None:
    """A store at 0004 with a base holding its bits upgrades and reads the same bits; going back to
    0004 drops the bases held by reference (their devices resend in full), keeping the others."""
    engine = sa.create_engine(sqlite_url)
    upgrade(engine, "0004")
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    mask = np.random.default_rng(4).random(999) < 0.5
    packed = np.packbits(mask, bitorder="little").tobytes()
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO fleets (id, name, created_at) VALUES (1, 'fleet', :t)"), {"t": now})
        c.execute(
            sa.text(
                "INSERT INTO tasks (id, task_id, fleet_pk, spec, seed, weights_digest, strategy, arch, "
                "created_at) VALUES (1, :task, 1, '{}', 1, 'd', 'fedmask', 'mlp', :t)"
            ),
            {"t": now, "task": TASK},
        )
        for pk in (1, 2):
            c.execute(
                sa.text(
                    "INSERT INTO devices (id, fleet_pk, device_id, first_seen_at, last_seen_at) "
                    "VALUES (:pk, 1, :device, :t, :t)"
                ),
                {"t": now, "pk": pk, "device": f"dev-{pk}"},
            )
        c.execute(
            sa.text(
                "INSERT INTO mask_bases (task_pk, device_pk, entry, round_no, num_bits, digest, bits, "
                "updated_at) VALUES (1, 1, 'mask', 3, 999, :digest, :bits, :t)"
            ),
            {"t": now, "digest": mask_digest(mask).hex(), "bits": zlib.compress(packed)},
        )
    upgrade(engine)
    with Store(sqlite_url) as store:
        (row,) = load_masks(store, TASK, "dev-1")
        assert (row.round_no, row.packed, row.payload) == (3, packed, None)
        with store.engine.begin() as c:  # a base by reference, as the ingest path writes them
            c.execute(
                sa.text("INSERT INTO blobs (sha256, size_bytes, data, created_at) VALUES ('p', 1, '', :t)"),
                {"t": now},
            )
            c.execute(
                sa.text(
                    "INSERT INTO mask_bases (task_pk, device_pk, entry, round_no, num_bits, digest, "
                    "payload_sha256, updated_at) VALUES (1, 2, 'mask', 3, 999, 'x', 'p', :t)"
                ),
                {"t": now},
            )
        # Bits or a reference, never both nor neither.
        with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as c:
            c.execute(sa.text("UPDATE mask_bases SET bits = NULL WHERE device_pk = 1"))
    downgrade(engine, "0004")
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT device_pk, bits FROM mask_bases")).all() == [
            (1, zlib.compress(packed))
        ]
    upgrade(engine)
    engine.dispose()
