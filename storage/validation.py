"""Checks on values handed to the store, so bad input fails with a message naming the field."""

from __future__ import annotations

import json
import math
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1  # INTEGER columns (round numbers, counts) on PostgreSQL


def as_bytes(value: Any, field: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{field}: expected bytes, got {type(value).__name__}")


def name(value: Any, field: str, max_length: int = 128) -> str:
    """A non-empty identifier (fleet, task or device id) that fits its column."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field}: expected a non-empty string, got {value!r}")
    if len(value) > max_length:
        raise ValueError(f"{field}: {len(value)} characters, at most {max_length} allowed")
    return value


def integer(value: Any, field: str, *, minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field}: expected an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{field}: {value} is outside [{minimum}, {maximum}]")
    return int(value)


def finite(value: Any, field: str, *, minimum: float = -math.inf, maximum: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field}: expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not minimum <= number <= maximum:
        raise ValueError(f"{field}: {value!r} is not a finite number in [{minimum}, {maximum}]")
    return number


def json_document(value: Any, field: str) -> dict[str, Any]:
    """A mapping that both engines store identically: JSON-serializable, string keys, no NaN/Infinity
    (PostgreSQL refuses them). Returned as it will read back, so callers compare like with like."""
    if not isinstance(value, dict):
        raise TypeError(f"{field}: expected a dict, got {type(value).__name__}")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: not storable as JSON ({exc})") from exc
    return json.loads(text)
