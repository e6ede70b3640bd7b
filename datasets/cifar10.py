"""CIFAR-10 "python version" batches, read without trusting the pickle format.

The official ``cifar-10-batches-py`` folder holds ``data_batch_1`` ... ``data_batch_5`` and
``test_batch``: Python 2 pickles of ``{"batch_label": str, "labels": [int], "data": uint8 ndarray
[10000, 3072], "filenames": [str]}`` (rows are 1024 red, 1024 green, 1024 blue pixels, row-major), and
``batches.meta`` with ``label_names``.

Loading an arbitrary pickle can run arbitrary code, so `read_batch` uses an unpickler whose
``find_class`` resolves only what an ndarray needs: NumPy's ``_reconstruct`` (replaced by a local
function that builds plain ``ndarray`` only), ``numpy.ndarray`` and ``numpy.dtype`` restricted to
plain numeric types (no object dtype, so no nested Python objects), and ``_codecs.encode`` restricted
to latin-1 (how a Python 3 protocol-2 pickle spells bytes). Anything else is refused before it runs.
"""

from __future__ import annotations

import pickle
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.federated import CentralSplit

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
_ALLOWED_DTYPES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"})


class _UnsafePickle(pickle.UnpicklingError):
    pass


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _UnsafePickle(f"array subtype {subtype!r} is not numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, _plain_dtype(dtype))


def _plain_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    name = spec.decode("latin-1") if isinstance(spec, bytes) else spec
    if not isinstance(name, str):
        raise _UnsafePickle(f"dtype {spec!r} is not a plain type code")
    dtype = np.dtype(name)
    if dtype.str[1:] not in _ALLOWED_DTYPES:
        raise _UnsafePickle(f"dtype {name!r} is not a plain numeric type")
    return np.dtype(name, align, copy)


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise _UnsafePickle("only _codecs.encode(str, 'latin1') is allowed")
    return text.encode("latin-1")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise _UnsafePickle(f"refusing to load {module}.{name}") from None


def read_batch(path: str | PathLike[str]) -> dict[str, Any]:
    """Unpickle one CIFAR batch file safely; keys come back as ``str``."""
    src = Path(path)
    if not src.is_file():
        raise DatasetError(src, "CIFAR-10 batch file does not exist")
    try:
        with src.open("rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="bytes").load()
    except _UnsafePickle as exc:
        raise DatasetError(src, f"not a plain CIFAR-10 batch: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise DatasetError(src, f"not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(src, f"expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def batch_arrays(path: str | PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels int64 from one batch file, validated."""
    batch = read_batch(path)
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DatasetError(path, f"batch lacks {' and '.join(missing)} (expected keys data, labels)")
    data, labels = batch["data"], batch["labels"]
    pixels = int(np.prod(IMAGE_SHAPE))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != pixels
    ):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(path, f"data must be a uint8 array [N, {pixels}], found {found}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(path, "labels must be a list of integers") from exc
    if y.shape != (len(data),):
        raise DatasetError(path, f"{len(data)} images but {y.size} labels")
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DatasetError(path, f"labels outside [0, {NUM_CLASSES})")
    return data.reshape(-1, *IMAGE_SHAPE), y


def find_batches_folder(root: str | PathLike[str]) -> Path:
    """``root`` or ``root/cifar-10-batches-py``, whichever holds ``test_batch``."""
    base = Path(root)
    for folder in (base, base / "cifar-10-batches-py"):
        if (folder / TEST_BATCH).is_file():
            return folder
    raise DatasetError(
        base, f"no CIFAR-10 batches here (expected {TEST_BATCH} and {', '.join(TRAIN_BATCHES)})"
    )


def load_cifar10(root: str | PathLike[str]) -> CentralSplit:
    """All five train batches and the test batch; images stay uint8 ``[N, 3, 32, 32]``."""
    folder = find_batches_folder(root)
    missing = [name for name in TRAIN_BATCHES if not (folder / name).is_file()]
    if missing:
        raise DatasetError(folder, f"missing CIFAR-10 batch files {', '.join(missing)}")
    train = [batch_arrays(folder / name) for name in TRAIN_BATCHES]
    x_test, y_test = batch_arrays(folder / TEST_BATCH)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return CentralSplit(x_train, y_train, x_test, y_test, NUM_CLASSES)


def label_names(root: str | PathLike[str]) -> list[str] | None:
    """Class names from ``batches.meta`` when present."""
    meta_path = find_batches_folder(root) / META_FILE
    if not meta_path.is_file():
        return None
    names = read_batch(meta_path).get("label_names")
    if not isinstance(names, list):
        raise DatasetError(meta_path, "label_names must be a list")
    return [n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in names]
