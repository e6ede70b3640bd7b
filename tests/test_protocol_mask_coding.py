"""Masks coded against bases (``mctx``): round trips, every fallback path, corruption, version 1."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmask.protocol import messages
from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.mask_bases import DeviceBases, ServerBases, plain
from fedmask.protocol.mask_coding import (
    Base,
    MaskContext,
    MaskRef,
    conditional_entropy_bits,
    decode_mask,
    encode_mask,
    mask_digest,
)
from fedmask.protocol.tensor_codec import CodecError, Coded, decode_coded_array, encode_array


def random_mask(rng: np.random.Generator, n: int, density: float) -> np.ndarray:
    return rng.random(n) < density


def flipped(rng: np.random.Generator, mask: np.ndarray, rate: float) -> np.ndarray:
    return mask ^ (rng.random(mask.size) < rate)


def held(*bases: Base | None):
    """A base lookup holding exactly these bases, by role."""
    by_role = dict(zip(("prev", "side"), bases, strict=False))
    return lambda role, ref: by_role.get(role)


masks = st.tuples(
    st.integers(0, 3000),  # length
    st.floats(0.0, 1.0),  # density
    st.floats(0.0, 0.5),  # flip rate from the previous mask
    st.floats(0.0, 0.5),  # disagreement with the consensus
    st.integers(0, 2**32 - 1),  # seed
    st.sampled_from(["none", "prev", "side", "both"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks)
def test_mctx_round_trips_any_mask_against_any_bases(case) -> None:
    n, density, flip, disagree, seed, which = case
    rng = np.random.default_rng(seed)
    prev = random_mask(rng, n, density)
    side = flipped(rng, prev, disagree)
    mask = flipped(rng, prev, flip)
    context = MaskContext(
        prev=Base(3, prev) if which in ("prev", "both") else None,
        side=Base(4, side) if which in ("side", "both") else None,
    )
    data = encode_mask(mask, context)
    np.testing.assert_array_equal(decode_mask(data, n, context), mask)
    # The stream is never more than a few header bits per context above the ideal cost.
    assert len(data) * 8 <= conditional_entropy_bits(mask, context) + 0.1 * n + 24 * 40


@settings(max_examples=200, deadline=None)
@given(masks)
def test_the_wire_coding_round_trips_and_never_exceeds_full_coding(case) -> None:
    n, density, flip, disagree, seed, which = case
    rng = np.random.default_rng(seed)
    prev = Base(1, random_mask(rng, n, density))
    side = Base(2, flipped(rng, prev.mask, disagree))
    mask = flipped(rng, prev.mask, flip).reshape(-1, 1) if n % 2 else flipped(rng, prev.mask, flip)
    context = MaskContext(
        prev=prev if which in ("prev", "both") else None, side=side if which != "none" else None
    )
    full = encode_array(Coded(mask, "bits"))
    item = encode_array(Coded(mask, "bits", context=context))
    assert len(msgpack.packb(item)) <= len(msgpack.packb(full)) + 1
    coded = decode_coded_array(item, bases=held(context.prev, context.side))
    assert coded.coding == "bits" and coded.array.shape == mask.shape
    np.testing.assert_array_equal(coded.array, mask)


# Every small length at every extreme density, and two million-bit cases (more would only cost time).
LENGTH_DENSITY = [(n, d) for n in (0, 1, 2, 3) for d in (0.0, 0.03, 0.5, 0.97, 1.0)]
LENGTH_DENSITY += [(1_000_000, 0.03), (1_000_000, 0.5)]


@pytest.mark.parametrize(("n", "density"), LENGTH_DENSITY)
def test_lengths_up_to_a_million_and_extreme_densities(n: int, density: float) -> None:
    rng = np.random.default_rng(n)
    prev = random_mask(rng, n, density)
    mask = flipped(rng, prev, 0.05)
    for context in (
        MaskContext(),
        MaskContext(prev=Base(1, prev)),
        MaskContext(Base(1, prev), Base(2, prev)),
    ):
        np.testing.assert_array_equal(decode_mask(encode_mask(mask, context), n, context), mask)


def test_a_settled_mask_costs_close_to_its_conditional_entropy() -> None:
    rng = np.random.default_rng(7)
    consensus = random_mask(rng, 200_000, 0.3)
    prev = flipped(rng, consensus, 0.05)
    mask = flipped(rng, prev, 0.04)
    context = MaskContext(Base(1, prev), Base(2, consensus))
    coded = len(encode_mask(mask, context)) * 8
    estimate = conditional_entropy_bits(mask, context)
    assert estimate < 0.5 * mask.size  # far below the 0.88 bit of its order-0 entropy
    assert coded <= 1.05 * estimate


# --- fallback paths: a base the receiver cannot use is a specific rejection --------------------------


def coded_item(rng: np.random.Generator) -> tuple[dict, Base, Base, np.ndarray]:
    prev = Base(5, random_mask(rng, 20_000, 0.6))
    side = Base(6, flipped(rng, prev.mask, 0.1))
    mask = flipped(rng, prev.mask, 0.05)
    return encode_array(Coded(mask, "bits", context=MaskContext(prev, side))), prev, side, mask


def reason(item: dict, lookup) -> str:
    with pytest.raises(CodecError) as err:
        decode_coded_array(item, bases=lookup)
    return err.value.reason


def test_no_base_is_missing_base() -> None:
    item, prev, side, _ = coded_item(np.random.default_rng(1))
    assert item["c"] == "mctx"
    assert reason(item, None) == "missing_base"
    assert reason(item, held(None, side)) == "missing_base"
    assert reason(item, held(prev, None)) == "missing_base"


def test_a_base_of_another_round_is_stale_base() -> None:
    item, prev, side, _ = coded_item(np.random.default_rng(2))
    assert reason(item, held(Base(4, prev.mask), side)) == "stale_base"
    assert reason(item, held(prev, Base(9, side.mask))) == "stale_base"


def test_a_base_with_another_digest_is_base_mismatch() -> None:
    rng = np.random.default_rng(3)
    item, prev, side, _ = coded_item(rng)
    other = Base(prev.round, flipped(rng, prev.mask, 0.001))
    assert reason(item, held(other, side)) == "base_mismatch"
    shorter = Base(prev.round, prev.mask[:-1])
    assert reason(item, held(shorter, side)) == "base_mismatch"


def test_a_wrong_base_with_a_forged_matching_ref_never_decodes_to_a_wrong_mask() -> None:
    """Even a lookup that lies about its base (same round, digest unchecked by it) cannot pass: the
    decoder checks the digest of the base itself and of the decoded mask."""
    rng = np.random.default_rng(4)
    item, prev, side, _ = coded_item(rng)
    item = dict(item, p=[prev.round, mask_digest(prev.mask)])
    liar = Base(prev.round, flipped(rng, prev.mask, 0.02))
    assert reason(item, held(liar, side)) == "base_mismatch"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_a_corrupted_coded_payload_is_a_rejection_never_a_wrong_mask(seed: int, flips: int) -> None:
    rng = np.random.default_rng(seed)
    item, prev, side, mask = coded_item(rng)
    data = bytearray(item["d"])
    for _ in range(flips):
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    if rng.random() < 0.3:  # or truncated / extended
        data = (
            data[: int(rng.integers(len(data)))]
            if rng.random() < 0.5
            else data + bytes([int(rng.integers(256))])
        )
    try:
        coded = decode_coded_array(dict(item, d=bytes(data)), bases=held(prev, side))
    except CodecError as exc:
        assert exc.reason in ("bad_array", "bad_mask_digest", "oversize")
    else:
        np.testing.assert_array_equal(coded.array, mask)  # only a change that decodes to the same mask


def test_a_corrupted_digest_is_bad_mask_digest() -> None:
    item, prev, side, _ = coded_item(np.random.default_rng(5))
    bad = bytes([item["h"][0] ^ 1]) + item["h"][1:]
    assert reason(dict(item, h=bad), held(prev, side)) == "bad_mask_digest"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"p": [5]}, "wrong_field_type"),
        ({"p": [5, b"short"]}, "wrong_field_type"),
        ({"q": ["6", bytes(8)]}, "wrong_field_type"),
        ({"h": b"x"}, "wrong_field_type"),
        ({"d": "text"}, "wrong_field_type"),
        ({"s": [10**12]}, "oversize"),
        ({"c": "mctx2"}, "unknown_coding"),
    ],
)
def test_malformed_mctx_fields_are_specific_rejections(change: dict, expected: str) -> None:
    item, prev, side, _ = coded_item(np.random.default_rng(6))
    assert reason(dict(item, **change), held(prev, side)) == expected


# --- messages: version 1 stays valid, unknown codings and base faults are rejections -----------------


def update(body) -> messages.Update:
    return messages.Update(
        fleet="f", task_id="t", device="d", round=3, base_round=3, num_samples=1, body=body
    )


def test_version_1_messages_decode_without_any_base() -> None:
    mask = np.random.default_rng(0).random(1000) < 0.5
    payload = messages.encode(update({"mask": Coded(mask, "bits")}))
    assert msgpack.unpackb(payload)["body"]["mask"]["c"] == "bits"
    decoded = messages.decode(payload, messages.Update)
    np.testing.assert_array_equal(decoded.body["mask"].array, mask)
    assert decoded.body["mask"].context is None


def test_a_message_with_a_base_it_cannot_use_is_refused_with_the_reason() -> None:
    rng = np.random.default_rng(1)
    prev = Base(2, rng.random(5000) < 0.8)
    mask = flipped(rng, prev.mask, 0.02)
    payload = messages.encode(update({"mask": Coded(mask, "bits", context=MaskContext(prev=prev))}))
    with pytest.raises(ProtocolError) as err:
        messages.decode(payload, messages.Update)
    assert err.value.reason is Rejection.MISSING_BASE
    decoded = messages.decode(payload, messages.Update, bases=lambda name: held(prev))
    np.testing.assert_array_equal(decoded.body["mask"].array, mask)
    assert decoded.body["mask"].context.prev.ref == prev.ref


def test_task_codings_are_optional_and_validated() -> None:
    from fixtures.fleet import fedmask_task

    task = fedmask_task("f", 4, task_id="t")
    assert task.codings == []
    raw = msgpack.unpackb(messages.encode(task))
    del raw["codings"], raw["sha256"]
    old = messages.decode(messages.seal(raw), messages.Task)  # a version-1 task without the field
    assert old.codings == []
    with pytest.raises(ProtocolError) as err:
        messages.Task(**{**task.__dict__, "codings": ["bits", "no/slash"]})
    assert err.value.reason is Rejection.BAD_ID


# --- the books: device and aggregator stay in step, and fall back when they do not ---------------------


def test_device_and_server_books_code_every_round_against_the_last_accepted_upload() -> None:
    rng = np.random.default_rng(2)
    device, server = DeviceBases(("bits", "mctx")), ServerBases()
    mask = rng.random(30_000) < 0.7
    sizes = []
    for round_no in range(1, 6):
        consensus = {"keep": Coded(flipped(rng, mask, 0.05), "bits")}
        announced = messages.encode(
            messages.RoundAnnouncement(
                fleet="f",
                task_id="t",
                round=round_no,
                deadline=0.0,
                body=server.downlink(round_no, consensus),
            )
        )
        server.announce(round_no, consensus)
        got = messages.decode(announced, messages.RoundAnnouncement, bases=device.announcement_bases())
        device.received(round_no, got.body)
        np.testing.assert_array_equal(got.body["keep"].array, consensus["keep"].array)
        mask = flipped(rng, mask, 0.03)
        payload = messages.encode(
            update_for(round_no, device.uplink({"mask": Coded(mask, "bits")}, round_no))
        )
        decoded = messages.decode(payload, messages.Update, bases=server.uplink_bases("d"))
        np.testing.assert_array_equal(decoded.body["mask"].array, mask)
        server.accept("d", round_no, decoded.body)
        device.confirm(round_no)
        sizes.append(len(payload))
    assert max(sizes[1:]) < 0.6 * sizes[0]  # against bases from round 2 on


def update_for(round_no: int, body) -> messages.Update:
    return messages.Update(
        fleet="f", task_id="t", device="d", round=round_no, base_round=round_no, num_samples=1, body=body
    )


def test_a_device_without_a_receipt_codes_against_the_older_base_and_the_aggregator_says_stale() -> None:
    rng = np.random.default_rng(3)
    device, server = DeviceBases(("bits", "mctx")), ServerBases()
    mask = rng.random(10_000) < 0.5
    for round_no in (1, 2):
        body = device.uplink({"mask": Coded(mask, "bits")}, round_no)
        decoded = messages.decode(
            messages.encode(update_for(round_no, body)), messages.Update, bases=server.uplink_bases("d")
        )
        server.accept("d", round_no, decoded.body)
        if round_no == 1:
            device.confirm(1)  # the receipt of round 2 is lost
        mask = flipped(rng, mask, 0.05)
    body = device.uplink({"mask": Coded(mask, "bits")}, 3)  # coded against round 1: stale for the server
    with pytest.raises(ProtocolError) as err:
        messages.decode(messages.encode(update_for(3, body)), messages.Update, bases=server.uplink_bases("d"))
    assert err.value.reason is Rejection.STALE_BASE
    device.forget_accepted()  # what the agent does on that rejection: the update again, in full
    full = messages.encode(update_for(3, plain(body)))
    np.testing.assert_array_equal(
        messages.decode(full, messages.Update, bases=server.uplink_bases("d")).body["mask"].array, mask
    )


def test_device_books_survive_the_state_file_round_trip() -> None:
    rng = np.random.default_rng(4)
    device = DeviceBases(("bits", "mctx"))
    device.received(7, {"keep": Coded(rng.random(999) < 0.4, "bits")})
    device.uplink({"mask": Coded(rng.random(999) < 0.4, "bits")}, 7)
    device.confirm(7)
    again = DeviceBases(("bits", "mctx"))
    again.load_state_arrays(device.state_arrays())
    assert again.consensus_ref == device.consensus_ref
    assert again.accepted["mask"].ref == device.accepted["mask"].ref
    assert isinstance(again.consensus_ref, MaskRef) and again.consensus_ref.round == 7


def test_a_repeated_announcement_of_the_round_held_still_decodes() -> None:
    """A deadline extension re-announces round r coded against r - 1, after the device took in r."""
    rng = np.random.default_rng(5)
    device, server = DeviceBases(("bits", "mctx")), ServerBases()
    keep = rng.random(20_000) < 0.6
    bodies = {}
    for round_no in (2, 3):
        keep = flipped(rng, keep, 0.05)
        bodies[round_no] = {"keep": Coded(keep, "bits")}
    server.announce(2, bodies[2])
    device.received(2, bodies[2])
    coded = messages.encode(
        messages.RoundAnnouncement(
            fleet="f", task_id="t", round=3, deadline=0.0, body=server.downlink(3, bodies[3])
        )
    )
    for _ in range(2):  # the announcement, then the same round again
        got = messages.decode(coded, messages.RoundAnnouncement, bases=device.announcement_bases())
        np.testing.assert_array_equal(got.body["keep"].array, keep)
        device.received(3, got.body)
    assert device.consensus_ref.round == 3 and device.earlier["keep"].round == 2
