"""LEAF JSON (Caldas et al., 2018) for FEMNIST and Shakespeare, as LEAF's preprocessing writes it.

Each file is ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``;
LEAF writes a ``train/`` and a ``test/`` folder of such files (``data/<dataset>/data/{train,test}``).
FEMNIST: ``x`` is 784 floats in [0, 1] (a 28x28 image, row-major), ``y`` a class 0..61. Shakespeare:
``x`` is an 80-character string, ``y`` the next character.

A device is a user with samples in both train and test (LEAF's default per-user sample split); users
present in only one of them (LEAF's ``--split user`` mode) cannot be personalized and are dropped with a
warning.
"""

from __future__ import annotations

import json
import logging
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.federated import DeviceData, FederatedDataset, unique_device_ids
from fedmask.datasets.shakespeare import SEQ_LEN, VOCAB_SIZE, encode, vocabulary_meta

logger = logging.getLogger(__name__)

FEMNIST_CLASSES = 62
FEMNIST_PIXELS = 28 * 28

UserSamples = dict[str, tuple[list[Any], list[Any], Path]]


def leaf_json_files(location: str | PathLike[str]) -> list[Path]:
    """``location`` itself if it is a file, else the ``*.json`` files in it, sorted."""
    loc = Path(location)
    if loc.is_file():
        return [loc]
    files = sorted(loc.glob("*.json")) if loc.is_dir() else []
    if not files:
        raise DatasetError(loc, "no LEAF JSON found (expected a .json file or a folder of them)")
    return files


def read_leaf_json(files: list[Path]) -> UserSamples:
    """Samples per user across ``files``: ``{user: (x list, y list, file)}``, in file order."""
    users: UserSamples = {}
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(path, f"not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or not all(k in doc for k in ("users", "num_samples", "user_data")):
            raise DatasetError(path, 'expected a JSON object with "users", "num_samples" and "user_data"')
        names, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
        if not isinstance(names, list) or not isinstance(counts, list) or len(names) != len(counts):
            raise DatasetError(path, '"users" and "num_samples" must be lists of the same length')
        if not isinstance(data, dict):
            raise DatasetError(path, '"user_data" must map each user to {"x": [...], "y": [...]}')
        for user, count in zip(names, counts):
            entry = data.get(user)
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("x"), list)
                or not isinstance(entry.get("y"), list)
            ):
                raise DatasetError(path, f'user_data[{user!r}] must be {{"x": [...], "y": [...]}}')
            if not len(entry["x"]) == len(entry["y"]) == count:
                raise DatasetError(
                    path,
                    f"user {user!r}: num_samples says {count} "
                    f"but x has {len(entry['x'])} and y {len(entry['y'])} samples",
                )
            if user in users:
                raise DatasetError(path, f"user {user!r} also appears in {users[user][2]}")
            users[str(user)] = (entry["x"], entry["y"], path)
    return users


def femnist_arrays(x: list[Any], y: list[Any], source: Path, user: str) -> tuple[np.ndarray, np.ndarray]:
    """One user's FEMNIST samples as ``[N, 1, 28, 28]`` float32 and int64 labels, validated."""
    try:
        images = np.asarray(x, dtype=np.float32) if x else np.empty((0, FEMNIST_PIXELS), dtype=np.float32)
        labels = np.asarray(y, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(
            source, f"user {user!r}: x must be lists of {FEMNIST_PIXELS} numbers, y integers"
        ) from exc
    if images.ndim != 2 or images.shape[1] != FEMNIST_PIXELS:
        raise DatasetError(
            source, f"user {user!r}: each x must have {FEMNIST_PIXELS} values, found shape {images.shape}"
        )
    if not np.all(np.isfinite(images)) or images.min(initial=0) < 0 or images.max(initial=0) > 1:
        raise DatasetError(source, f"user {user!r}: pixel values must be in [0, 1]")
    if labels.ndim != 1 or labels.min(initial=0) < 0 or labels.max(initial=0) >= FEMNIST_CLASSES:
        raise DatasetError(source, f"user {user!r}: y must be integers in [0, {FEMNIST_CLASSES})")
    return images.reshape(-1, 1, 28, 28), labels


def shakespeare_arrays(x: list[Any], y: list[Any], source: Path, user: str) -> tuple[np.ndarray, np.ndarray]:
    """One user's LEAF Shakespeare samples as int64 ``[N, 80]`` and ``[N]`` character indices."""
    if not all(isinstance(s, str) and len(s) == SEQ_LEN for s in x):
        raise DatasetError(source, f"user {user!r}: each x must be a string of {SEQ_LEN} characters")
    if not all(isinstance(c, str) and len(c) == 1 for c in y):
        raise DatasetError(source, f"user {user!r}: each y must be a single character")
    return encode("".join(x)).reshape(-1, SEQ_LEN), encode("".join(y))


_KINDS = {
    "femnist": (femnist_arrays, FEMNIST_CLASSES, (1, 28, 28), np.float32),
    "shakespeare": (shakespeare_arrays, VOCAB_SIZE, (SEQ_LEN,), np.int64),
}


def load_leaf(
    train: str | PathLike[str],
    test: str | PathLike[str],
    kind: str,
    *,
    max_users: int | None = None,
) -> FederatedDataset:
    """A LEAF data set (``kind`` "femnist" or "shakespeare") from its train and test JSON.

    ``max_users`` keeps the users with the most train samples (ties by name).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown LEAF data set {kind!r}; expected one of {', '.join(_KINDS)}")
    to_arrays, num_classes, input_shape, input_dtype = _KINDS[kind]
    train_users = read_leaf_json(leaf_json_files(train))
    test_users = read_leaf_json(leaf_json_files(test))
    users = [u for u in train_users if u in test_users]
    dropped = len(train_users) + len(test_users) - 2 * len(users)
    if dropped:
        logger.warning("LEAF %s: %d users are in only one of train/test and were dropped", kind, dropped)
    if not users:
        raise DatasetError(
            test, "no user has both train and test samples (generate LEAF data with the sample split)"
        )
    if max_users is not None:
        keep = set(sorted(users, key=lambda u: (-len(train_users[u][1]), u))[:max_users])
        users = [u for u in users if u in keep]
    meta = vocabulary_meta() if kind == "shakespeare" else {}
    devices = []
    for device_id, user in zip(unique_device_ids(users), users):
        x_train, y_train = to_arrays(train_users[user][0], train_users[user][1], train_users[user][2], user)
        x_test, y_test = to_arrays(test_users[user][0], test_users[user][1], test_users[user][2], user)
        devices.append(
            DeviceData(device_id, x_train, y_train, x_test, y_test, num_classes=num_classes, meta=meta)
        )
    return FederatedDataset(
        name=f"{kind}_leaf",
        partition="natural",
        num_classes=num_classes,
        input_shape=input_shape,
        input_dtype=input_dtype,
        devices=devices,
        meta={**meta, "users": {d.device_id: u for d, u in zip(devices, users)}},
    )
