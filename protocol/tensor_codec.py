"""How a strategy's arrays are coded on the wire.

A strategy exchanges *bodies*: ``dict[str, np.ndarray]`` where each entry names its coding. Both the
simulator and the MQTT deployment encode bodies with this module, so the bytes a simulation counts are
the bytes that cross the broker.

Codings
- ``bits``: a boolean array, bit-packed (1 bit per element, little bit order), then entropy-coded with
  zlib when that is smaller. A FedMask mask costs at most 1 bit per parameter plus a few header bytes.
- ``f32`` / ``f16``: little-endian floats.
- ``topk``: a float32 array sent as (positions, values) of its non-zero entries; positions are
  delta-coded varints, then zlib. Used by Top-K sparsification.
- ``i64``: little-endian integers (labels, counts).

A coded array is a msgpack map ``{"c": coding, "s": shape, "z": compressed?, "d": bytes}``.

A ``bits`` array whose :class:`Coded` carries a ``context`` (the bases the receiver holds, see
``protocol.mask_coding``) may instead travel as ``{"c": "mctx", "s": shape, "d": bytes, "h": digest,
"p": [round, digest] | nil, "q": [round, digest] | nil}``: coded against those bases, whichever of the
two is smaller. The receiver decodes it with a lookup of the bases it holds and gets the plain
``bits`` array back (its ``Coded.context`` names the bases used). An unknown ``c`` is refused as
``unknown_coding``.

Decoding never trusts a declared size: shapes are checked (in Python integers, so they cannot wrap)
against ``max_elements`` before anything is allocated, and compressed data is inflated only up to the
size its shape implies. Callers that know the model should pass its parameter count as
``max_elements``; the default only stops absurd shapes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedmask.protocol import mask_coding
from fedmask.protocol.mask_coding import BaseLookup, MaskCodingError, MaskContext, MaskRef

CODINGS = ("bits", "f32", "f16", "topk", "i64")
# Wire-only codings: they decode to one of CODINGS (``mctx`` to ``bits``).
WIRE_CODINGS = (*CODINGS, mask_coding.CONTEXT)
# Hard cap on the elements one array may declare, so a hostile shape cannot make us allocate without bound.
MAX_ELEMENTS = 1 << 28
# numpy refuses more than 64 dimensions; no layer needs more than a handful.
MAX_DIMS = 32
# zlib's default level. Level 9 took 10x the CPU (407 ms vs 38 ms for a 1M-parameter mask at 5%
# density) for a 4.5% smaller payload: a bad trade on a Raspberry Pi.
ZLIB_LEVEL = 6


class CodecError(ValueError):
    """A coded array that cannot be decoded; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Coded:
    """An array with the coding it is to travel in."""

    array: np.ndarray
    coding: str
    # ``bits`` only: the bases the receiver holds (a MaskContext), so the array may travel coded against
    # them; on a decoded array, the bases it was coded against. Never part of equality.
    context: MaskContext | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.coding not in CODINGS:
            raise ValueError(f"unknown coding {self.coding!r}; expected one of {CODINGS}")

    @classmethod
    def packed_bits(cls, packed: bytes, dims: tuple[int, ...]) -> Coded:
        """A decoded ``bits`` array kept in its wire form (``pack_bits``, padding already checked): the
        aggregator checks, digests and stores masks packed, and ``array`` unpacks only when asked
        (8x the memory, and most of the cost of decoding an update)."""
        coded = object.__new__(cls)
        object.__setattr__(coded, "coding", "bits")
        object.__setattr__(coded, "context", None)
        object.__setattr__(coded, "_packed", (packed, dims))
        return coded

    def __getattr__(self, name: str):
        # Only reached for an attribute not set: the ``array`` of a ``packed_bits`` one, unpacked once.
        packed = self.__dict__.get("_packed")
        if name != "array" or packed is None:
            raise AttributeError(name)
        data, dims = packed
        array = unpack_bits(data, math.prod(dims)).reshape(dims)
        object.__setattr__(self, "array", array)
        return array

    @property
    def shape(self) -> tuple[int, ...]:
        packed = self.__dict__.get("_packed")
        return packed[1] if packed is not None else tuple(np.shape(self.array))

    @property
    def packed(self) -> bytes | None:
        """The packed bits of a ``bits`` array decoded as ``packed_bits`` (None otherwise)."""
        packed = self.__dict__.get("_packed")
        return None if packed is None else packed[0]

    def __eq__(self, other: object) -> bool:
        # The generated __eq__ compares arrays with ``==`` and raises for more than one element.
        if not isinstance(other, Coded):
            return NotImplemented
        return (
            self.coding == other.coding
            and np.shape(self.array) == np.shape(other.array)
            and bool(np.array_equal(self.array, other.array))
        )


def pack_bits(bits: np.ndarray) -> bytes:
    """Pack a boolean array into bytes, 8 elements per byte, little bit order (element 0 = bit 0)."""
    flat = np.ascontiguousarray(bits, dtype=bool).reshape(-1)
    return np.packbits(flat, bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; ``count`` elements, padding bits must be zero."""
    check_packed(data, count)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    return bits[:count].view(bool)  # 0/1 bytes are valid bools: no copy


def check_packed(data: bytes, count: int) -> None:
    """``data`` is exactly :func:`pack_bits` of ``count`` elements: its length, zero padding bits."""
    need = (count + 7) // 8
    if len(data) != need:
        raise CodecError("wrong_mask_length", f"{len(data)} bytes for {count} bits, expected {need}")
    if count % 8 and data[-1] >> (count % 8):
        raise CodecError("wrong_mask_length", "non-zero padding bits after the last element")


def _maybe_compress(raw: bytes) -> tuple[bool, bytes]:
    packed = zlib.compress(raw, ZLIB_LEVEL)
    return (True, packed) if len(packed) < len(raw) else (False, raw)


def _varints(values: np.ndarray) -> bytes:
    """LEB128 varints of non-negative integers, vectorised (a Python loop is too slow for 1e6 entries)."""
    v = values.astype(np.uint64)
    out_len = np.maximum(1, (np.floor(np.log2(np.maximum(v, 1))).astype(np.int64) // 7) + 1)
    out = np.empty(int(out_len.sum()), dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(out_len)[:-1]))
    for k in range(int(out_len.max(initial=1))):
        active = out_len > k
        byte = (v[active] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = out_len[active] > k + 1
        out[starts[active] + k] = (byte | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8)
    return out.tobytes()


def _unvarints(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero((raw & 0x80) == 0)
    if len(ends) != count or (len(raw) and (not len(ends) or ends[-1] != len(raw) - 1)):
        raise CodecError("bad_array", f"expected {count} varints in {len(raw)} bytes")
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max(initial=1) > 9:
        raise CodecError("bad_array", "varint longer than 9 bytes")
    values = np.zeros(count, dtype=np.uint64)
    for k in range(int(lengths.max(initial=1))):
        active = lengths > k
        values[active] |= (raw[starts[active] + k].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * k)
    return values


def _encode_mctx(arr: np.ndarray, context: MaskContext, full_size: int) -> dict | None:
    """The ``mctx`` map of a mask if it is smaller than the full coding's ``full_size`` data bytes."""
    flat = np.ascontiguousarray(arr, dtype=bool).reshape(-1)
    usable = context.usable(flat.size)
    data = mask_coding.encode_mask(flat, usable)
    refs = [None if b is None else b.ref.to_wire() for b in (usable.prev, usable.side)]
    # what the extra keys cost on the wire: digest (1 + 8 + 1 key) and each ref (~13 bytes + key)
    overhead = 12 + sum(14 if r is not None else 2 for r in refs)
    if len(data) + overhead >= full_size:
        return None
    return {
        "c": mask_coding.CONTEXT,
        "s": list(arr.shape),
        "d": data,
        "h": mask_coding.mask_digest(flat),
        "p": refs[0],
        "q": refs[1],
    }


def encode_array(coded: Coded) -> dict:
    """Code one array as a msgpack-ready map."""
    arr = np.asarray(coded.array)
    shape = list(arr.shape)
    if coded.coding == "bits" and coded.context is not None:
        compressed, data = _maybe_compress(pack_bits(arr))
        mctx = _encode_mctx(arr, coded.context, len(data) + 1)
        if mctx is not None:
            return mctx
    elif coded.coding == "bits":
        compressed, data = _maybe_compress(pack_bits(arr))
    elif coded.coding in ("f32", "f16"):
        dtype = "<f4" if coded.coding == "f32" else "<f2"
        compressed, data = False, arr.astype(dtype).tobytes()
    elif coded.coding == "i64":
        compressed, data = False, arr.astype("<i8").tobytes()
    else:  # topk
        flat = arr.reshape(-1).astype("<f4")
        positions = np.flatnonzero(flat)
        deltas = np.diff(positions, prepend=0) if len(positions) else positions
        body = len(positions).to_bytes(4, "little") + flat[positions].tobytes() + _varints(deltas)
        compressed, data = _maybe_compress(body)
    return {"c": coded.coding, "s": shape, "z": compressed, "d": data}


def _check_shape(shape: object, max_elements: int) -> tuple[tuple[int, ...], int]:
    """Validate a declared shape; returns (dims, element count). Python ints, so nothing wraps."""
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise CodecError("wrong_field_type", f"shape must be a list of non-negative ints, got {shape!r}")
    if len(shape) > MAX_DIMS:
        raise CodecError("bad_array", f"shape has {len(shape)} dimensions, at most {MAX_DIMS} allowed")
    count = 1
    for n in shape:
        count *= n
        if count > max_elements:
            raise CodecError("oversize", f"shape {shape} exceeds the limit of {max_elements} elements")
    return tuple(shape), count


def _inflate(data: bytes, limit: int) -> bytes:
    """zlib-decompress with a size bound (a zip bomb must not exhaust memory)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise CodecError("bad_array", f"corrupt compressed data ({exc})") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise CodecError("oversize", f"decompressed data exceeds the declared {limit} bytes")
    # A truncated stream inflates without error; only ``eof`` proves the whole stream (and its
    # Adler-32 check) was there.
    if not inflater.eof or inflater.unused_data:
        raise CodecError("bad_array", "compressed data is truncated or has trailing bytes")
    return out


def _resolve(role: str, ref: MaskRef, lookup: BaseLookup | None, n: int) -> mask_coding.Base:
    """The base a coded mask names, as this side holds it; a specific rejection if it does not."""
    held = lookup(role, ref) if lookup is not None else None
    if held is None:
        raise CodecError("missing_base", f"no {role} base held for round {ref.round}")
    if held.round != ref.round:
        raise CodecError("stale_base", f"{role} base of round {ref.round} named, round {held.round} held")
    if held.mask.size != n or held.ref.digest != ref.digest:
        raise CodecError("base_mismatch", f"{role} base of round {ref.round} held with another digest")
    return held


def _decode_mctx(item: dict, dims: tuple[int, ...], count: int, lookup: BaseLookup | None) -> Coded:
    data, digest = item.get("d"), item.get("h")
    if (
        not isinstance(data, bytes)
        or not isinstance(digest, bytes)
        or len(digest) != mask_coding.DIGEST_BYTES
    ):
        raise CodecError("wrong_field_type", "mctx array needs bytes 'd' and an 8-byte digest 'h'")
    if len(data) > (count + 7) // 8:  # an encoder sends mctx only when it beats the packed bits
        raise CodecError("oversize", f"{len(data)} coded bytes for a mask of {count} bits")
    try:
        bases = []
        for role, key in (("prev", "p"), ("side", "q")):
            raw = item.get(key)
            bases.append(None if raw is None else _resolve(role, MaskRef.from_wire(raw, key), lookup, count))
        context = MaskContext(*bases)
        mask = mask_coding.decode_mask(data, count, context)
    except MaskCodingError as exc:
        raise CodecError(exc.reason, exc.detail) from exc
    if mask_coding.mask_digest(mask) != digest:
        raise CodecError("bad_mask_digest", "the decoded mask does not match its digest")
    return Coded(mask.reshape(dims), "bits", context=context)


def decode_array(
    item: object, *, max_elements: int = MAX_ELEMENTS, bases: BaseLookup | None = None
) -> tuple[np.ndarray, str]:
    """Decode a map made by :func:`encode_array`, validating every field; returns (array, coding).

    An array declaring more than ``max_elements`` elements is refused (``oversize``) before any
    allocation. ``bases`` looks up the masks this side holds, for ``mctx`` arrays.
    """
    coded = decode_coded_array(item, max_elements=max_elements, bases=bases)
    return coded.array, coded.coding


def decode_coded_array(
    item: object, *, max_elements: int = MAX_ELEMENTS, bases: BaseLookup | None = None
) -> Coded:
    """Like :func:`decode_array`, as a :class:`Coded` (which names the bases an ``mctx`` mask used)."""
    if not isinstance(item, dict):
        raise CodecError("wrong_field_type", f"coded array must be a map, got {type(item).__name__}")
    coding, shape, compressed, data = item.get("c"), item.get("s"), item.get("z"), item.get("d")
    if not isinstance(coding, str) or coding not in WIRE_CODINGS:
        raise CodecError("unknown_coding", f"unknown coding {coding!r:.40}")
    if coding == mask_coding.CONTEXT:
        dims, count = _check_shape(shape, min(max_elements, MAX_ELEMENTS))
        return _decode_mctx(item, dims, count, bases)
    if not isinstance(compressed, bool) or not isinstance(data, bytes):
        raise CodecError("wrong_field_type", "coded array needs bool 'z' and bytes 'd'")
    dims, count = _check_shape(shape, min(max_elements, MAX_ELEMENTS))
    if coding == "bits":
        raw = _inflate(data, (count + 7) // 8) if compressed else data
        check_packed(raw, count)
        return Coded.packed_bits(raw, dims)
    if coding in ("f32", "f16", "i64"):
        width = {"f32": 4, "f16": 2, "i64": 8}[coding]
        if compressed or len(data) != count * width:
            raise CodecError("wrong_mask_length", f"{len(data)} bytes for {count} {coding} values")
        dtype = {"f32": "<f4", "f16": "<f2", "i64": "<i8"}[coding]
        arr = np.frombuffer(data, dtype=dtype).reshape(dims)
        out = arr.astype(np.float32) if coding != "i64" else arr.astype(np.int64)
        return Coded(out, coding)
    # topk: positions are delta-coded varints after the values
    body = _inflate(data, 4 + count * (4 + 9)) if compressed else data
    if len(body) < 4:
        raise CodecError("bad_array", "top-k body shorter than its header")
    k = int.from_bytes(body[:4], "little")
    if k > count or len(body) < 4 + 4 * k:
        raise CodecError("bad_array", f"top-k declares {k} values for {count} elements")
    values = np.frombuffer(body[4 : 4 + 4 * k], dtype="<f4")
    deltas = _unvarints(body[4 + 4 * k :], k)
    # Check the deltas before summing them: each below ``count`` keeps the sum far from overflowing.
    if k and (deltas.max() >= count or (k > 1 and not deltas[1:].all())):
        raise CodecError("bad_array", "top-k positions out of range or not increasing")
    positions = np.cumsum(deltas).astype(np.int64)
    if k and positions[-1] >= count:
        raise CodecError("bad_array", "top-k positions out of range or not increasing")
    flat = np.zeros(count, dtype=np.float32)
    flat[positions] = values
    return Coded(flat.reshape(dims), coding)


# For a body: entry name -> the base lookup of that entry (or None).
BodyBases = Callable[[str], "BaseLookup | None"]


def encode_body(body: Mapping[str, Coded]) -> dict:
    """Code a strategy body (name → Coded) as a msgpack-ready map."""
    return {name: encode_array(coded) for name, coded in body.items()}


def decode_coded_body(
    raw: object, *, max_elements: int = MAX_ELEMENTS, bases: BodyBases | None = None
) -> dict[str, Coded]:
    """Decode a body map into name → :class:`Coded` (array plus the coding it travelled in).

    ``max_elements`` bounds the elements of the whole body, not of each entry. ``bases(name)`` gives
    the base lookup for the entry ``name`` (``mctx`` masks); without it such masks are ``missing_base``.
    """
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise CodecError("wrong_field_type", "body must be a map from names to coded arrays")
    out: dict[str, Coded] = {}
    budget = max_elements
    for name, item in raw.items():
        try:
            coded = decode_coded_array(
                item, max_elements=budget, bases=None if bases is None else bases(name)
            )
        except CodecError as exc:
            raise CodecError(exc.reason, f"body entry {name!r}: {exc.detail}") from exc
        budget -= math.prod(coded.shape)
        out[name] = coded
    return out


def decode_body(raw: object, *, max_elements: int = MAX_ELEMENTS) -> dict[str, np.ndarray]:
    """Decode a body map into name → array, validating every entry.

    Entries that are already :class:`Coded` (the body of a message returned by
    ``protocol.messages.decode``) are passed through as their arrays.
    """
    if isinstance(raw, dict) and raw and all(isinstance(v, Coded) for v in raw.values()):
        return {name: coded.array for name, coded in raw.items()}
    return {name: coded.array for name, coded in decode_coded_body(raw, max_elements=max_elements).items()}
