"""The aggregator's mask bases in the store: a restarted aggregator decodes masks coded against them."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from fedmask.aggregator.mask_books import StoredBases
from fedmask.protocol import messages
from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.mask_bases import DeviceBases
from fedmask.protocol.mask_coding import mask_digest
from fedmask.protocol.tensor_codec import Coded
from fedmask.storage import Store
from fedmask.storage.mask_bases import load_masks, save_masks

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
