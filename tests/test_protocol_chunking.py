"""protocol.chunking: split under a payload cap, reassemble through duplicates, reordering, loss and
tampering, with bounded memory; wire_size is the sum of the real frames; the retained-topic plan."""

from __future__ import annotations

import os
import random

import msgpack
import numpy as np
import pytest

from fedmask.protocol import messages as m
from fedmask.protocol.chunking import (
    DEFAULT_MAX_PAYLOAD,
    MAX_CHUNKS,
    Publication,
    Reassembler,
    message_id,
    parse_frame,
    publications,
    split,
    wire_size,
)
from fedmask.protocol.cli_options import DEFAULT_MAX_PAYLOAD as CLI_DEFAULT_MAX_PAYLOAD
from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.tensor_codec import Coded

SENDER = "fedmask/v1/fleet-a/up/dev-1"


def big_update(n_params: int = 3_000_000) -> m.Update:
    """A FedMask-sized update: a random (incompressible) mask of ``n_params`` bits, ~375 KB."""
    mask = np.random.default_rng(1).random(n_params) > 0.5
    return m.Update(
        fleet="fleet-a",
        task_id="t",
        device="dev-1",
        round=2,
        base_round=2,
        num_samples=100,
        metrics={"loss": 0.5},
        body={"mask": Coded(mask, "bits")},
    )


def reason_of(call) -> Rejection:
    with pytest.raises(ProtocolError) as err:
        call()
    return err.value.reason


def test_a_payload_that_fits_travels_unwrapped() -> None:
    payload = m.encode(m.Presence(fleet="f", device="d", status="online", at=1.0))
    assert split(payload, 1024) == [payload]
    assert Reassembler().accept(SENDER, payload) == payload
    assert wire_size(payload, 1024) == len(payload)


@pytest.mark.parametrize("max_payload", [1024, 4096, DEFAULT_MAX_PAYLOAD])
def test_frames_stay_under_the_cap_and_reassemble_in_order(max_payload: int) -> None:
    payload = m.encode(big_update())
    frames = split(payload, max_payload)
    assert len(frames) > 1
    assert all(len(f) <= max_payload for f in frames)
    # the cap is used well: every frame but the last is within 64 bytes of it
    assert all(len(f) > max_payload - 64 for f in frames[:-1])
    reassembler = Reassembler()
    results = [reassembler.accept(SENDER, f) for f in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    assert results[-1] == payload
    assert m.decode(results[-1], m.Update) == big_update()
    assert reassembler.pending_messages == 0 and reassembler.pending_bytes == 0


def test_wire_size_is_the_sum_of_the_real_frames() -> None:
    message = big_update()
    frames = split(m.encode(message), DEFAULT_MAX_PAYLOAD)
    assert wire_size(message, DEFAULT_MAX_PAYLOAD) == sum(len(f) for f in frames)
    assert wire_size(m.encode(message), 2048) == sum(len(f) for f in split(m.encode(message), 2048))
    assert wire_size(message) > len(m.encode(message))  # frames cost a header each


def test_out_of_order_frames_reassemble() -> None:
    payload = os.urandom(50_000)
    frames = split(payload, 2048)
    random.Random(3).shuffle(frames)
    reassembler = Reassembler()
    results = [reassembler.accept(SENDER, f) for f in frames]
    assert [r for r in results if r is not None] == [payload]
    assert results[-1] == payload


def test_duplicate_frames_are_idempotent_and_reported() -> None:
    payload = os.urandom(10_000)
    frames = split(payload, 2048)
    reassembler = Reassembler()
    reassembler.accept(SENDER, frames[0])
    assert reason_of(lambda: reassembler.accept(SENDER, frames[0])) is Rejection.DUPLICATE_CHUNK
    for frame in frames[1:-1]:
        assert reassembler.accept(SENDER, frame) is None
    assert reassembler.accept(SENDER, frames[-1]) == payload
    # a QoS 1 redelivery after completion does not open a new, never-completing message
    with pytest.raises(ProtocolError) as err:
        reassembler.accept(SENDER, frames[2])
    assert err.value.reason is Rejection.DUPLICATE_CHUNK and err.value.benign
    assert reassembler.pending_messages == 0


def test_a_resent_message_merges_with_frames_already_received() -> None:
    payload = os.urandom(10_000)
    first, second = split(payload, 2048), split(payload, 2048)  # same content: same default id
    assert message_id(payload) == msgpack.unpackb(first[0])["id"]
    reassembler = Reassembler()
    for frame in first[:3]:
        reassembler.accept(SENDER, frame)
    out = [reassembler.accept(SENDER, f) for f in second[3:]]
    assert out[-1] == payload


def test_same_msg_id_from_two_senders_is_kept_apart() -> None:
    a, b = os.urandom(5000), os.urandom(5000)
    frames_a, frames_b = split(a, 2048, msg_id="m1"), split(b, 2048, msg_id="m1")
    reassembler = Reassembler()
    for fa, fb in zip(frames_a[:-1], frames_b[:-1]):
        reassembler.accept("dev-a", fa)
        reassembler.accept("dev-b", fb)
    assert reassembler.accept("dev-b", frames_b[-1]) == b
    assert reassembler.accept("dev-a", frames_a[-1]) == a


def frame_with(frame: bytes, **changes) -> bytes:
    raw = msgpack.unpackb(frame)
    raw.update(changes)
    return msgpack.packb(raw, use_bin_type=True)


def test_chunk_out_of_range_is_refused() -> None:
    frames = split(os.urandom(5000), 2048)
    reassembler = Reassembler()
    assert reason_of(lambda: reassembler.accept(SENDER, frame_with(frames[0], index=3, count=3))) is (
        Rejection.CHUNK_OUT_OF_RANGE
    )
    assert reason_of(lambda: reassembler.accept(SENDER, frame_with(frames[0], index=-1))) is (
        Rejection.CHUNK_OUT_OF_RANGE
    )
    assert reason_of(lambda: reassembler.accept(SENDER, frame_with(frames[0], count=MAX_CHUNKS + 1))) is (
        Rejection.CHUNK_OUT_OF_RANGE
    )
    assert reassembler.pending_messages == 0


def test_mismatched_chunks_are_refused() -> None:
    payload = os.urandom(5000)
    frames = split(payload, 2048)
    reassembler = Reassembler()
    reassembler.accept(SENDER, frames[0])
    # a later frame that disagrees on the total hash, size or count
    for change in ({"total_sha256": bytes(32)}, {"size": 5001}, {"count": 4}):
        assert reason_of(lambda c=change: reassembler.accept(SENDER, frame_with(frames[1], **c))) is (
            Rejection.CHUNK_MISMATCH
        )
    # the same index again with other data
    tampered = frame_with(frames[0], data=b"x" * len(msgpack.unpackb(frames[0])["data"]))
    assert reason_of(lambda: reassembler.accept(SENDER, tampered)) is Rejection.CHUNK_MISMATCH
    # tampered data in a new frame: caught by total_sha256 when the message completes
    last = msgpack.unpackb(frames[-1])
    bad_last = frame_with(frames[-1], data=bytes(len(last["data"])))
    reassembler.accept(SENDER, frames[1])
    assert reason_of(lambda: reassembler.accept(SENDER, bad_last)) is Rejection.CHUNK_MISMATCH
    assert reassembler.pending_messages == 0  # the corrupt message is dropped, not kept half-done


def test_missing_chunks_expire_with_a_report() -> None:
    frames = split(os.urandom(9000), 2048)
    expired: list[tuple[str, str, ProtocolError]] = []
    reassembler = Reassembler(timeout_s=30, on_expired=lambda *args: expired.append(args))
    reassembler.accept(SENDER, frames[0], now=100.0)
    reassembler.accept(SENDER, frames[2], now=110.0)
    assert reassembler.expire(now=139.0) == []
    errors = reassembler.expire(now=141.0)
    assert [e.reason for e in errors] == [Rejection.MISSING_CHUNK]
    assert "1, 3, 4" in errors[0].detail
    assert expired and expired[0][0] == SENDER and expired[0][2] is errors[0]
    assert reassembler.pending_messages == 0 and reassembler.pending_bytes == 0


def test_memory_is_bounded_per_sender_and_in_total() -> None:
    reassembler = Reassembler(
        max_pending=3, max_pending_bytes=30_000, max_pending_per_sender=2, max_message_size=20_000
    )
    payloads = [os.urandom(9000) for _ in range(4)]
    firsts = [split(p, 2048)[0] for p in payloads]
    # one sender may hold two incomplete messages; a third supersedes its oldest
    reassembler.accept("dev-a", firsts[0])
    reassembler.accept("dev-a", firsts[1])
    reassembler.accept("dev-a", firsts[2])
    assert reassembler.pending_messages == 2 and reassembler.pending_bytes == 18_000
    # the byte budget: 18,000 + 9,000 fits, one more message does not
    reassembler.accept("dev-b", firsts[3])
    assert reason_of(lambda: reassembler.accept("dev-c", firsts[0])) is Rejection.REASSEMBLY_FULL
    # a message larger than any message may be is refused on its first frame
    huge = split(os.urandom(25_000), 4096)[0]
    assert reason_of(lambda: reassembler.accept("dev-c", huge)) is Rejection.OVERSIZE


def test_malformed_frames_are_refused() -> None:
    reassembler = Reassembler()
    assert reason_of(lambda: reassembler.accept(SENDER, b"\xc1")) is Rejection.MALFORMED_MSGPACK
    assert reason_of(lambda: reassembler.accept(SENDER, msgpack.packb([1]))) is Rejection.NOT_A_MAP
    frame = split(os.urandom(5000), 2048)[0]
    assert (
        reason_of(lambda: reassembler.accept(SENDER, frame_with(frame, v=9))) is Rejection.UNSUPPORTED_VERSION
    )
    assert reason_of(lambda: reassembler.accept(SENDER, frame_with(frame, id="a/b"))) is Rejection.BAD_ID
    assert (
        reason_of(lambda: reassembler.accept(SENDER, frame_with(frame, index="0")))
        is Rejection.WRONG_FIELD_TYPE
    )
    assert reassembler.accept(SENDER, b"") is None  # a cleared retained message


def test_split_refuses_a_cap_too_small_for_a_frame_header() -> None:
    with pytest.raises(ValueError, match="at least 1024"):
        split(os.urandom(5000), 512)


def test_parse_frame_returns_none_for_a_message() -> None:
    assert parse_frame(m.encode(m.Presence(fleet="f", device="d", status="offline", at=0))) is None


def test_cli_default_matches_the_chunker() -> None:
    assert CLI_DEFAULT_MAX_PAYLOAD == DEFAULT_MAX_PAYLOAD


# --- the publication plan ------------------------------------------------------------------------------


def test_non_retained_frames_go_to_the_topic_itself() -> None:
    payload = os.urandom(5000)
    plan = publications("t/up/d", payload, max_payload=2048)
    assert [p.topic for p in plan] == ["t/up/d"] * len(split(payload, 2048))
    assert not any(p.retain for p in plan)


def test_retained_chunked_message_uses_chunk_topics_and_clears_stale_ones() -> None:
    payload = os.urandom(5000)
    frames = split(payload, 2048)
    plan = publications("t/round", payload, max_payload=2048, retain=True, previous_frames=5)
    assert plan[: len(frames)] == [Publication(f"t/round/chunk/{i}", f, True) for i, f in enumerate(frames)]
    assert plan[len(frames)] == Publication("t/round", b"", True)
    assert plan[len(frames) + 1 :] == [
        Publication(f"t/round/chunk/{i}", b"", True) for i in range(len(frames), 5)
    ]


def test_retained_message_that_fits_clears_earlier_chunks() -> None:
    plan = publications("t/round", b"small", max_payload=2048, retain=True, previous_frames=2)
    assert plan == [
        Publication("t/round", b"small", True),
        Publication("t/round/chunk/0", b"", True),
        Publication("t/round/chunk/1", b"", True),
    ]


def test_one_sender_cannot_take_the_budget_every_sender_shares() -> None:
    """Four partial messages declaring 64 MiB each from one device used to fill the whole shared
    budget, and every other device's chunked message was refused (reassembly_full) for minutes."""
    reassembler = Reassembler()  # the defaults the aggregator runs with
    flood = [
        msgpack.packb(
            {"v": 1, "type": "chunk", "id": f"flood{i:011d}", "index": 0, "count": 2, "size": 64 * 2**20,
             "total_sha256": bytes(32), "data": b"x"},
            use_bin_type=True,
        )
        for i in range(4)
    ]  # fmt: skip
    for frame in flood:
        assert reassembler.accept("dev-greedy", frame) is None
    assert reassembler.pending_bytes <= 64 * 2**20  # its own budget: each new one superseded the last
    payload = os.urandom(9000)
    frames = split(payload, 2048)
    results = [reassembler.accept("dev-honest", f) for f in frames]
    assert results[-1] == payload
