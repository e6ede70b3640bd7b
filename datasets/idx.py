"""IDX files: MNIST, Fashion-MNIST and EMNIST, gzipped or raw.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order. Images are ``idx3`` (``[N, 28, 28]``
uint8), labels ``idx1`` (``[N]`` uint8).

File names: MNIST and Fashion-MNIST use ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
EMNIST uses ``emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]`` and stores each
image transposed, which `load_idx` undoes.
"""

from __future__ import annotations

import gzip
import zlib
from os import PathLike
from pathlib import Path

import numpy as np

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.federated import CentralSplit
from fedmask.datasets.parse_cache import ParseCache, content_key

# IDX type code -> NumPy dtype (big-endian where it matters).
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# EMNIST split -> number of classes. "letters" labels are 1..26 in the files; we shift them to 0..25.
EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10, "mnist": 10}


def read_idx(path: str | PathLike[str], expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw), validating magic number, type and size.

    Parsed arrays are cached per process, keyed by file content, and returned read-only; copy
    before writing.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(p, "IDX file does not exist")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DatasetError(p, f"cannot read ({exc})") from exc
    array = _CACHE.get_or_parse(content_key([(p.name, raw)]), lambda: _decode_file(p, raw))
    if expected_ndim is not None and array.ndim != expected_ndim:
        raise DatasetError(p, f"IDX file has {array.ndim} dimensions; expected {expected_ndim}")
    return array


_CACHE: ParseCache[np.ndarray] = ParseCache(max_items=8)


def _decode_file(path: Path, raw: bytes) -> np.ndarray:
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(path, f"cannot decompress ({exc})") from exc
    return parse_idx(raw, source=path)


def parse_idx(raw: bytes, source: str | PathLike[str] = "<bytes>") -> np.ndarray:
    """Decode the bytes of an IDX file; ``source`` names the file in errors."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(source, "not an IDX file: expected magic number 0x0000TTDD (two zero bytes first)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise DatasetError(
            source, f"unknown IDX type code 0x{type_code:02x}; expected one of 08 09 0B 0C 0D 0E"
        )
    if ndim < 1:
        raise DatasetError(source, "IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(source, f"truncated IDX header: {len(raw)} bytes for {ndim} dimensions")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[type_code]
    expected = header_len + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            source,
            f"IDX size mismatch: header says shape {shape} ({expected} bytes) but the file has {len(raw)}",
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    array = array.astype(dtype.newbyteorder("="), copy=False)
    array.setflags(write=False)
    return array


def find_idx_file(root: Path, stems: list[str]) -> Path:
    """The first of ``stem``/``stem.gz`` under ``root``; a `DatasetError` naming them all if none exists."""
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
    wanted = " or ".join(f"{s}[.gz]" for s in stems)
    raise DatasetError(root, f"missing IDX file: expected {wanted}")


def load_idx(root: str | PathLike[str], emnist_split: str | None = None) -> CentralSplit:
    """Load an MNIST-style data set from ``root``: images ``[N, 1, 28, 28]`` uint8, labels int64.

    With ``emnist_split`` (e.g. "balanced", "digits") the EMNIST file names are used, images are
    transposed to upright, and "letters" labels are shifted to start at 0.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(base, "IDX data folder does not exist")
    if emnist_split is not None and emnist_split not in EMNIST_CLASSES:
        raise ValueError(f"unknown EMNIST split {emnist_split!r}; expected one of {sorted(EMNIST_CLASSES)}")
    arrays = {}
    for split, mnist_name, emnist_name in (("train", "train", "train"), ("test", "t10k", "test")):
        for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
            stem = (
                f"emnist-{emnist_split}-{emnist_name}-{kind}-ubyte"
                if emnist_split
                else f"{mnist_name}-{kind}-ubyte"
            )
            arrays[split, kind] = (path := find_idx_file(base, [stem]), read_idx(path, expected_ndim=ndim))
    halves = []
    for split in ("train", "test"):
        (img_path, images), (lbl_path, labels) = arrays[split, "images-idx3"], arrays[split, "labels-idx1"]
        if len(images) != len(labels):
            raise DatasetError(img_path, f"{len(images)} images but {lbl_path.name} has {len(labels)} labels")
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise DatasetError(img_path, "expected unsigned-byte (type 0x08) images and labels")
        if emnist_split:
            images = images.transpose(0, 2, 1)
        y = labels.astype(np.int64)
        if emnist_split == "letters":
            y -= 1
        halves.append((np.ascontiguousarray(images[:, None]), y, lbl_path))
    num_classes = EMNIST_CLASSES[emnist_split] if emnist_split else int(max(h[1].max() for h in halves)) + 1
    for _, y, lbl_path in halves:
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DatasetError(lbl_path, f"labels outside [0, {num_classes})")
    (x_train, y_train, _), (x_test, y_test, _) = halves
    return CentralSplit(x_train, y_train, x_test, y_test, num_classes)
