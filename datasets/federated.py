"""The federated data model (one `DeviceData` per device) and the per-device `.npz` file.

A device file is what a device agent's ``--data PATH`` reads: a NumPy ``.npz`` archive holding plain
arrays only (never pickled objects), so that it is safe to receive from elsewhere:

========================  ===========================================================
key                       content
========================  ===========================================================
``format_version``        int, currently 1
``device_id``             str
``num_classes``           int, size of the federation's label space
``x_train``, ``x_test``   float32 ``[N, ...]`` (images, sensor windows) or int64 ``[N, L]``
                          (character sequences)
``y_train``, ``y_test``   int64 ``[N]``, each in ``[0, num_classes)``
``meta_json``             str, JSON object with dataset facts a device needs (e.g. vocabulary)
========================  ===========================================================
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from fedmask.datasets.errors import DatasetError

DEVICE_FILE_VERSION = 1
INPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.int64))
_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
_REQUIRED_KEYS = ("format_version", "device_id", "num_classes", *_ARRAY_KEYS)


@dataclass
class DeviceData:
    """One device's local data: a train split and a test split from the same distribution."""

    device_id: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    # Size of the federation's label space; set by the loaders and stored in the device file so a
    # device can build its classifier without seeing anyone else's data.
    num_classes: int | None = None
    # JSON-serialisable dataset facts the device needs (e.g. the vocabulary for character models).
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(
                    f"device {self.device_id!r}: x_{split} has {len(x)} samples but y_{split} has {len(y)}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"device {self.device_id!r}: x_train samples have shape {self.x_train.shape[1:]} "
                f"but x_test samples have shape {self.x_test.shape[1:]}"
            )

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


@dataclass
class FederatedDataset:
    """A data set split across devices, each with its own train and test data.

    ``input_shape`` is the shape of one sample (e.g. ``(1, 28, 28)``, ``(3, 128)``, ``(80,)``);
    ``partition`` names how devices were formed ("natural", "shards", "dirichlet", "iid").
    """

    name: str
    partition: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    devices: list[DeviceData]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_dtype = np.dtype(self.input_dtype)
        self.input_shape = tuple(int(d) for d in self.input_shape)
        ids = [d.device_id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"data set {self.name!r}: device ids are not unique")

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def device(self, device_id: str) -> DeviceData:
        """The device with this id (KeyError when there is none)."""
        for dev in self.devices:
            if dev.device_id == device_id:
                return dev
        raise KeyError(f"data set {self.name!r} has no device {device_id!r}")

    def label_counts(self, dev: DeviceData, split: str = "train") -> np.ndarray:
        """How many samples of each class ``dev`` holds in ``split`` ("train" or "test")."""
        labels = dev.y_train if split == "train" else dev.y_test
        return np.bincount(labels, minlength=self.num_classes)


@dataclass(frozen=True)
class CentralSplit:
    """A centralized train/test split (before partitioning), as the IDX and CIFAR-10 loaders return it.

    Images stay ``uint8`` here (a quarter of the memory of float32); `to_unit_float` converts the
    samples a device actually receives.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """``uint8`` pixels 0..255 as ``float32`` in [0, 1]."""
    return images.astype(np.float32) * np.float32(1.0 / 255.0)


_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_device_id(name: str) -> str:
    """A device id usable in MQTT topics and file names: letters, digits, ``_ . -`` only."""
    cleaned = _UNSAFE_ID_CHARS.sub("_", name.strip()).strip("_")
    if not cleaned:
        raise ValueError(f"cannot derive a device id from {name!r}")
    return cleaned


def unique_device_ids(names: list[str]) -> list[str]:
    """`safe_device_id` for each name, with ``-2``, ``-3`` ... appended where two names collide."""
    seen: dict[str, int] = {}
    ids = []
    for name in names:
        base = safe_device_id(name)
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return ids


def save_device(data: DeviceData, path: str | PathLike[str], num_classes: int | None = None) -> Path:
    """Write one device's data to ``path`` (a ``.npz``; no pickled objects). Returns the path."""
    classes = num_classes if num_classes is not None else data.num_classes
    if classes is None:
        raise ValueError(f"device {data.device_id!r}: num_classes is unknown; pass it to save_device")
    for split in ("train", "test"):  # refuse to write what load_device would refuse to read
        x = getattr(data, f"x_{split}")
        if x.dtype not in INPUT_DTYPES:
            raise ValueError(f"device {data.device_id!r}: x_{split} is {x.dtype}; expected float32 or int64")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:
        np.savez(
            fh,
            format_version=np.int64(DEVICE_FILE_VERSION),
            device_id=np.str_(data.device_id),
            num_classes=np.int64(classes),
            x_train=data.x_train,
            y_train=data.y_train.astype(np.int64, copy=False),
            x_test=data.x_test,
            y_test=data.y_test.astype(np.int64, copy=False),
            meta_json=np.str_(json.dumps(data.meta, sort_keys=True)),
        )
    return out


def load_device(path: str | PathLike[str]) -> DeviceData:
    """Read a device file written by `save_device`, checking every field it relies on."""
    src = Path(path)
    if not src.is_file():
        raise DatasetError(src, "device data file does not exist")
    try:
        with np.load(src, allow_pickle=False) as npz:
            missing = [k for k in _REQUIRED_KEYS if k not in npz.files]
            if missing:
                raise DatasetError(
                    src,
                    f"device data file lacks {', '.join(missing)} "
                    f"(expected keys {', '.join(_REQUIRED_KEYS)})",
                )
            arrays = {k: npz[k] for k in (*_REQUIRED_KEYS, "meta_json") if k in npz.files}
    except DatasetError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DatasetError(src, f"not a readable .npz archive ({exc})") from exc
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise DatasetError(src, f"holds an entry that is not a plain array ({exc})") from exc

    version = _scalar(src, arrays, "format_version", np.integer)
    if version != DEVICE_FILE_VERSION:
        raise DatasetError(src, f"format_version is {version}; this code reads version {DEVICE_FILE_VERSION}")
    device_id = str(_scalar(src, arrays, "device_id", np.str_))
    num_classes = int(_scalar(src, arrays, "num_classes", np.integer))
    if num_classes < 1:
        raise DatasetError(src, f"num_classes must be >= 1, found {num_classes}")
    meta: dict[str, Any] = {}
    if "meta_json" in arrays:
        try:
            meta = json.loads(str(_scalar(src, arrays, "meta_json", np.str_)))
        except json.JSONDecodeError as exc:
            raise DatasetError(src, f"meta_json is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise DatasetError(src, "meta_json must hold a JSON object")
    for split in ("train", "test"):
        _check_split(src, arrays[f"x_{split}"], arrays[f"y_{split}"], split, num_classes)
    try:
        return DeviceData(
            device_id=device_id,
            x_train=arrays["x_train"],
            y_train=arrays["y_train"].astype(np.int64, copy=False),
            x_test=arrays["x_test"],
            y_test=arrays["y_test"].astype(np.int64, copy=False),
            num_classes=num_classes,
            meta=meta,
        )
    except ValueError as exc:
        raise DatasetError(src, str(exc)) from exc


def _scalar(src: Path, arrays: dict[str, np.ndarray], key: str, kind: type) -> Any:
    value = arrays[key]
    if value.shape != () or not np.issubdtype(value.dtype, kind):
        raise DatasetError(
            src, f"{key} must be a scalar of kind {kind.__name__}, found {value.dtype} {value.shape}"
        )
    return value[()]


def _check_split(src: Path, x: np.ndarray, y: np.ndarray, split: str, num_classes: int) -> None:
    if x.dtype not in INPUT_DTYPES:
        raise DatasetError(src, f"x_{split} has dtype {x.dtype}; expected float32 or int64")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(src, f"y_{split} must be a 1-D integer array, found {y.dtype} {y.shape}")
    if x.ndim < 2 or len(x) != len(y):
        raise DatasetError(src, f"x_{split} has shape {x.shape}; expected [{len(y)}, ...] to match y_{split}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(src, f"y_{split} has labels outside [0, {num_classes})")
