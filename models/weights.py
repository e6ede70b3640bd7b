"""Frozen weights every party derives bit-identically from ``(seed, name)``, and their digest.

Weights never travel: the task names an architecture and a seed, and each device rebuilds the
same random network. That only works if the generator is independent of platform, numpy version
and torch version, so the bits come from SHAKE-256 (a standard extendable-output function) and
are turned into float32 with exactly rounded IEEE operations only. This module needs numpy alone.

Bit order: bit ``i`` of the stream is ``(byte[i // 8] >> (i % 8)) & 1`` (little-endian within each
byte, ``np.unpackbits(..., bitorder="little")``). A set bit means ``+1``, a clear bit ``-1``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np

SIGN_DOMAIN = "fedmask-weights/v1"
# The dense initialization uses its own domain so that its values are independent of the signs.
UNIFORM_DOMAIN = "fedmask-weights/v1/kaiming-uniform"
DIGEST_DOMAIN = b"fedmask-weights-digest/v1\x00"


def _xof(domain: str, seed: int, name: str, n_bytes: int) -> bytes:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not name:
        raise ValueError("weight name must be a non-empty string")
    return hashlib.shake_256(f"{domain}/{seed}/{name}".encode()).digest(n_bytes)


def _count(shape: tuple[int, ...]) -> int:
    if any(int(d) <= 0 for d in shape):
        raise ValueError(f"weight shape must have positive dimensions, got {shape}")
    return math.prod(int(d) for d in shape)


def _check_fan_in(fan_in: int) -> None:
    if fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")


def sign_bits(seed: int, name: str, n: int) -> np.ndarray:
    """The first ``n`` bits of the sign stream of ``(seed, name)`` as a bool array (little-endian)."""
    raw = np.frombuffer(_xof(SIGN_DOMAIN, seed, name, (n + 7) // 8), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


def signed_constant(
    seed: int, name: str, shape: tuple[int, ...], fan_in: int, gain: float = math.sqrt(2)
) -> np.ndarray:
    """Signed Kaiming constant weights: float32 ``sign * gain / sqrt(fan_in)``.

    Signs come from ``shake_256(f"fedmask-weights/v1/{seed}/{name}")``, one bit per weight in
    C order; the magnitude is one float64 expression rounded once to float32, so the result is
    byte-identical everywhere.
    """
    _check_fan_in(fan_in)
    n = _count(shape)
    magnitude = np.float32(gain / math.sqrt(fan_in))
    values = np.where(sign_bits(seed, name, n), magnitude, -magnitude).astype(np.float32)
    return values.reshape(shape)


def kaiming_uniform(
    seed: int, name: str, shape: tuple[int, ...], fan_in: int, gain: float = math.sqrt(2)
) -> np.ndarray:
    """Kaiming-uniform float32 weights in ``[-b, b)``, ``b = gain * sqrt(3 / fan_in)``, for dense mode.

    Each weight takes one little-endian uint32 word of the XOF; its top 24 bits give a uniform
    ``u`` in ``[0, 1)`` that float32 represents exactly, and ``(2u - 1) * b`` is computed in float64
    and rounded once, so the values are byte-identical on every platform.
    """
    _check_fan_in(fan_in)
    n = _count(shape)
    words = np.frombuffer(_xof(UNIFORM_DOMAIN, seed, name, 4 * n), dtype="<u4")
    unit = (words >> np.uint32(8)).astype(np.float64) * 2.0**-24
    bound = gain * math.sqrt(3.0 / fan_in)
    return ((2.0 * unit - 1.0) * bound).astype(np.float32).reshape(shape)


def digest_arrays(named_arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """Hex SHA-256 over ``(name, shape, little-endian float32 bytes)`` of each array, in the given order.

    Per array the hash takes the UTF-8 name, a NUL byte, the number of dimensions and each
    dimension as little-endian uint64, then the data as ``<f4`` in C order.
    """
    h = hashlib.sha256(DIGEST_DOMAIN)
    for name, array in named_arrays:
        data = np.ascontiguousarray(array, dtype="<f4")
        h.update(name.encode() + b"\x00")
        h.update(np.array([data.ndim, *data.shape], dtype="<u8").tobytes())
        h.update(data.tobytes())
    return h.hexdigest()


def weights_digest(model: object) -> str:
    """Hex SHA-256 of every frozen weight of ``model`` in its fixed layer order.

    ``model`` is a ``MaskedNetwork`` (anything with ``frozen_weights()`` yielding ``(name, array)``
    pairs). The task carries this digest; a device that derives another one refuses the task.
    """
    frozen = getattr(model, "frozen_weights", None)
    if frozen is None:
        raise TypeError(f"{type(model).__name__} has no frozen_weights(); expected a MaskedNetwork")
    return digest_arrays(frozen())
