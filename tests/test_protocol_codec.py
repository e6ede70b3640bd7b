"""Property tests of protocol.tensor_codec: round trips for every coding, and hostile input that must
end in CodecError (never another exception, never an allocation the input does not justify)."""

from __future__ import annotations

import tracemalloc
import zlib

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmask.protocol.tensor_codec import (
    CODINGS,
    CodecError,
    Coded,
    decode_array,
    decode_body,
    decode_coded_body,
    encode_array,
    encode_body,
    pack_bits,
    unpack_bits,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)


def finite_floats(width: int) -> st.SearchStrategy[float]:
    return st.floats(allow_nan=False, allow_infinity=False, width=width)


def arrays_for(coding: str) -> st.SearchStrategy[np.ndarray]:
    """Arrays a coding represents exactly (so the round trip must be bit-identical)."""
    if coding == "bits":
        return hnp.arrays(np.bool_, shapes)
    if coding == "f16":
        return hnp.arrays(np.float16, shapes, elements=finite_floats(16)).map(lambda a: a.astype(np.float32))
    if coding == "i64":
        return hnp.arrays(np.int64, shapes)
    # f32 and top-k: mostly zeros, so top-k really is sparse
    sparse = st.one_of(st.just(0.0), finite_floats(32))
    return hnp.arrays(np.float32, shapes, elements=sparse)


@FAST
@given(hnp.arrays(np.bool_, shapes))
def test_pack_unpack_bits_round_trip(bits: np.ndarray) -> None:
    packed = pack_bits(bits)
    assert len(packed) == (bits.size + 7) // 8
    assert np.array_equal(unpack_bits(packed, bits.size), bits.reshape(-1))


@FAST
@given(st.integers(1, 200), st.integers(0, 7))
def test_unpack_bits_refuses_set_padding(count: int, extra_bit: int) -> None:
    packed = bytearray(pack_bits(np.zeros(count, bool)))
    if count % 8 == 0:  # no padding bits to set: a byte too many instead
        packed.append(1)
    else:
        packed[-1] |= 1 << max(count % 8, 7 - extra_bit % (8 - count % 8))
    with pytest.raises(CodecError) as err:
        unpack_bits(bytes(packed), count)
    assert err.value.reason == "wrong_mask_length"


@pytest.mark.parametrize("coding", CODINGS)
def test_encode_decode_round_trip_every_coding(coding: str) -> None:
    @FAST
    @given(arrays_for(coding))
    def check(array: np.ndarray) -> None:
        item = encode_array(Coded(array, coding))
        # through real msgpack, as on the wire
        decoded, got_coding = decode_array(msgpack.unpackb(msgpack.packb(item, use_bin_type=True)))
        assert got_coding == coding
        assert decoded.shape == array.shape
        assert np.array_equal(decoded, array)
        assert decoded.dtype == {"bits": np.bool_, "i64": np.int64}.get(coding, np.float32)

    check()


def test_bits_of_a_sparse_mask_compress_below_one_bit_per_element() -> None:
    mask = np.zeros(100_000, bool)
    mask[::97] = True
    item = encode_array(Coded(mask, "bits"))
    assert item["z"] is True and len(item["d"]) < mask.size // 8
    assert np.array_equal(decode_array(item)[0], mask)


def test_coded_equality_compares_arrays_and_coding() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert Coded(a, "f32") == Coded(a.copy(), "f32")
    assert Coded(a, "f32") != Coded(a, "f16")
    assert Coded(a, "f32") != Coded(a.reshape(3, 2), "f32")
    assert Coded(a, "f32") != Coded(a + 1, "f32")


def test_decode_body_passes_decoded_coded_entries_through() -> None:
    body = {"w": Coded(np.ones((2, 2), np.float32), "f32"), "m": Coded(np.array([True, False]), "bits")}
    decoded = decode_coded_body(msgpack.unpackb(msgpack.packb(encode_body(body))))
    assert decoded == body
    arrays = decode_body(decoded)
    assert set(arrays) == {"w", "m"} and np.array_equal(arrays["m"], [True, False])


# --- hostile input -------------------------------------------------------------------------------------

CODEC_REASONS = ("oversize", "bad_array", "wrong_field_type", "wrong_mask_length", "unknown_coding")

HOSTILE_ITEMS = {
    "shape product wraps int64": {"c": "f32", "s": [1 << 32, 1 << 32], "z": False, "d": b""},
    "shape beyond uint64": {"c": "f32", "s": [(1 << 64) - 1], "z": False, "d": b""},
    "too many dimensions": {"c": "f32", "s": [1] * 70, "z": False, "d": b"\0\0\0\0"},
    "boolean dimension": {"c": "f32", "s": [True], "z": False, "d": b"\0\0\0\0"},
    "top-k positions overflow": {
        "c": "topk",
        "s": [10],
        "z": False,
        "d": (2).to_bytes(4, "little") + bytes(8) + bytes([0x80] * 8 + [0x40]) * 2,
    },
    "top-k position repeated": {
        "c": "topk",
        "s": [10],
        "z": False,
        "d": (2).to_bytes(4, "little") + bytes(8) + bytes([3, 0]),
    },
    "top-k varint without end": {
        "c": "topk",
        "s": [10],
        "z": False,
        "d": (1).to_bytes(4, "little") + bytes(4) + b"\x80",
    },
    "truncated zlib stream": {"c": "bits", "s": [8], "z": True, "d": zlib.compress(b"\x01")[:-3]},
    "zlib with trailing bytes": {"c": "bits", "s": [8], "z": True, "d": zlib.compress(b"\x01") + b"x"},
    "zip bomb": {"c": "bits", "s": [64], "z": True, "d": zlib.compress(bytes(1 << 20))},
    "unknown coding": {"c": "f64", "s": [1], "z": False, "d": bytes(8)},
    "coding not a string": {"c": ["bits"], "s": [1], "z": False, "d": b"\x01"},
    "data not bytes": {"c": "f32", "s": [1], "z": False, "d": "abcd"},
    "float data short": {"c": "f32", "s": [2], "z": False, "d": bytes(7)},
    "not a map": [1, 2, 3],
}


@pytest.mark.parametrize("item", HOSTILE_ITEMS.values(), ids=HOSTILE_ITEMS.keys())
def test_hostile_coded_arrays_raise_codec_error(item: object) -> None:
    with pytest.raises(CodecError) as err:
        decode_array(item)
    assert err.value.reason in CODEC_REASONS


def test_declared_shape_beyond_max_elements_is_refused_before_allocation() -> None:
    item = encode_array(Coded(np.zeros(10, np.float32), "topk"))  # k = 0: a few bytes of data
    item["s"] = [1 << 27]  # would be a 512 MiB float32 array
    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as err:
            decode_array(item, max_elements=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.reason == "oversize"
    assert peak < 1 << 20


def test_body_element_budget_is_shared_by_all_entries() -> None:
    body = encode_body({f"w{i}": Coded(np.zeros(600, np.float32), "f32") for i in range(2)})
    assert decode_coded_body(body, max_elements=1200)  # exactly fits
    with pytest.raises(CodecError) as err:
        decode_coded_body(body, max_elements=1199)
    assert err.value.reason == "oversize" and "'w1'" in err.value.detail


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[bytes, str]:
    coding = draw(st.sampled_from(CODINGS))
    array = draw(arrays_for(coding))
    packed = bytearray(msgpack.packb(encode_array(Coded(array, coding)), use_bin_type=True))
    action = draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    if action == "truncate":
        del packed[draw(st.integers(0, len(packed) - 1)) :]
    else:
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(packed) - 1))
            packed[pos] = (
                packed[pos] ^ (1 << draw(st.integers(0, 7)))
                if action == "flip"
                else draw(st.integers(0, 255))
            )
    return bytes(packed), coding


@settings(max_examples=200, deadline=None)
@given(corrupted())
def test_corrupted_arrays_decode_or_raise_codec_error_within_bounded_memory(case: tuple[bytes, str]) -> None:
    packed, _ = case
    try:
        item = msgpack.unpackb(packed, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return  # the message layer turns this into malformed_msgpack; tested there
    tracemalloc.start()
    try:
        try:
            array, coding = decode_array(item, max_elements=1 << 16)
        except CodecError as exc:
            assert exc.reason in CODEC_REASONS
        else:
            assert coding in CODINGS and array.size <= 1 << 16
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 65,536 elements of float32 plus temporaries; a hostile shape must not push past that.
    assert peak < 8 << 20


@FAST
@given(hnp.arrays(bool, shapes))
def test_decoded_bits_stay_packed_until_read(bits: np.ndarray) -> None:
    """A decoded mask keeps its wire bytes (what the aggregator digests and stores) and unpacks only
    when its array is read; a set padding bit is refused at decoding, not later."""
    item = encode_array(Coded(bits, "bits"))
    coded = decode_coded_body({"m": item})["m"]
    assert coded.packed == pack_bits(bits) and coded.shape == bits.shape
    assert "array" not in vars(coded)  # not unpacked by decoding
    assert coded == Coded(bits, "bits") and coded.array.dtype == bool
    if bits.size % 8:
        raw = bytearray(pack_bits(bits))
        raw[-1] |= 0x80
        with pytest.raises(CodecError, match="padding"):
            decode_coded_body({"m": {**item, "z": False, "d": bytes(raw)}})
