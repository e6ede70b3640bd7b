"""Reading and writing the safetensors format (a JSON header and raw little-endian tensors).

The personalized model's weights leave the device in this format: it is what other tools load, and it
carries no code (unlike a pickled ``torch.save`` file), so the aggregator can store it without risk.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def dumps(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize named arrays (float32, float16, int64, bool, uint8) in name order."""
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in NAMES:
            raise TypeError(f"safetensors: {name}: unsupported dtype {array.dtype}")
        data = array.astype(dtype, copy=False).tobytes()
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def loads(data: bytes) -> dict[str, np.ndarray]:
    """Parse a safetensors file; raises ValueError naming what is wrong."""
    if len(data) < 8:
        raise ValueError("safetensors: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(MAX_HEADER, len(data) - 8):
        raise ValueError(f"safetensors: header length {length} exceeds the file")
    header = json.loads(data[8 : 8 + length])
    body = memoryview(data)[8 + length :]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"))
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if (
            dtype is None
            or not 0 <= start <= end <= len(body)
            or (end - start) != dtype.itemsize * int(np.prod(shape))
        ):
            raise ValueError(f"safetensors: tensor {name!r} has a bad dtype, shape or offsets")
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).copy()
    return out
