"""Turn a centralized train/test split into a federation with a synthetic partition.

Train data are cut by `partition.shards`, `partition.dirichlet` or `partition.iid`. Test data follow
the rule in `partition.matching_test_indices`: each device gets test samples from the held-out test
split with the same label proportions as its train samples; by default as many as its share of the
train split (``round(num_train * len(test) / len(train))``), e.g. 100 test images for a device with
600 of Fashion-MNIST's 60,000 train images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmask.datasets import partition as part
from fedmask.datasets.federated import CentralSplit, DeviceData, FederatedDataset, to_unit_float

SYNTHETIC_PARTITIONS = ("shards", "dirichlet", "iid")


def split_train(
    labels: np.ndarray,
    partition: str,
    num_devices: int,
    seed: int = 0,
    *,
    shards_per_device: int = 2,
    shard_size: int | None = None,
    alpha: float = 0.5,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Train indices per device for a synthetic ``partition``."""
    if partition == "shards":
        return part.shards(labels, num_devices, shards_per_device, shard_size, seed)
    if partition == "dirichlet":
        return part.dirichlet(labels, num_devices, alpha, seed, min_size)
    if partition == "iid":
        return part.iid(len(labels), num_devices, seed)
    raise ValueError(f"unknown partition {partition!r}; expected one of {', '.join(SYNTHETIC_PARTITIONS)}")


def federate_central(
    name: str,
    data: CentralSplit,
    partition: str,
    num_devices: int,
    seed: int = 0,
    *,
    test_per_device: int | None = None,
    max_train_per_device: int | None = None,
    meta: dict[str, Any] | None = None,
    **partition_options: Any,
) -> FederatedDataset:
    """Split ``data`` over ``num_devices`` devices; ``partition_options`` go to `split_train`.

    ``max_train_per_device`` keeps a seeded random subset of a larger device's train samples (small runs).

    ``uint8`` images become ``float32`` in [0, 1] per device, so the full data set never exists
    twice in float form.
    """
    train_parts = split_train(data.y_train, partition, num_devices, seed, **partition_options)
    if max_train_per_device is not None:  # a seeded subsample keeps each device's label mix
        rng = np.random.default_rng(seed + 2)
        train_parts = [
            np.sort(rng.permutation(idx)[:max_train_per_device]) if len(idx) > max_train_per_device else idx
            for idx in train_parts
        ]
    if test_per_device is None:
        ratio = len(data.y_test) / len(data.y_train)
        test_sizes: list[int] | int = [round(len(idx) * ratio) for idx in train_parts]
    else:
        test_sizes = test_per_device
    # A different stream from the train split's, so changing the test rule never moves train data.
    test_parts = part.matching_test_indices(
        [data.y_train[idx] for idx in train_parts], data.y_test, test_sizes, seed=seed + 1
    )
    convert = to_unit_float if data.x_train.dtype == np.uint8 else np.asarray
    width = max(3, len(str(num_devices - 1)))
    info = dict(meta or {})
    devices = [
        DeviceData(
            device_id=f"device{k:0{width}d}",
            x_train=convert(data.x_train[tr]),
            y_train=data.y_train[tr],
            x_test=convert(data.x_test[te]),
            y_test=data.y_test[te],
            num_classes=data.num_classes,
            meta=info,
        )
        for k, (tr, te) in enumerate(zip(train_parts, test_parts))
    ]
    sample = convert(data.x_train[:1])
    return FederatedDataset(
        name=name,
        partition=partition,
        num_classes=data.num_classes,
        input_shape=sample.shape[1:],
        input_dtype=sample.dtype,
        devices=devices,
        meta=info,
    )
