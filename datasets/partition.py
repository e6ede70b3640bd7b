"""Partitioners: which sample goes to which device. Pure NumPy, seeded, no I/O.

Each partitioner returns a list with one sorted ``int64`` index array per device. Synthetic partitions
(`shards`, `dirichlet`, `iid`) cut a central *train* split; `matching_test_indices` then gives every device
test samples from the central *test* split with the same label proportions as its train samples, so
that a device is evaluated on the distribution it trained on (the personalized-FL setting).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IndexArrays = list[np.ndarray]


def natural(groups: Sequence[object] | np.ndarray) -> IndexArrays:
    """One index array per distinct value of ``groups`` (volunteer, speaker, writer ...).

    Devices come in sorted order of the group values, i.e. device ``k`` is ``np.unique(groups)[k]``.
    """
    values = np.asarray(groups)
    if values.ndim != 1:
        raise ValueError(f"groups must be 1-D, found shape {values.shape}")
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    return list(np.split(order, np.cumsum(counts)[:-1]))


def iid(n: int, num_devices: int, seed: int = 0) -> IndexArrays:
    """Shuffle ``n`` samples and deal them into ``num_devices`` parts whose sizes differ by at most one."""
    _check_devices(num_devices, n)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_devices)]


def shards(
    labels: Sequence[int] | np.ndarray,
    num_devices: int,
    shards_per_device: int = 2,
    shard_size: int | None = None,
    seed: int = 0,
) -> IndexArrays:
    """McMahan et al.'s pathological non-IID split: sort by label, cut into shards, deal shards out.

    The samples are sorted by label (randomly within a label), cut into consecutive shards of
    ``shard_size`` (default: as large as lets every device get ``shards_per_device`` shards), and
    ``num_devices * shards_per_device`` shards, chosen at random, are dealt out at random. Samples in
    shards nobody drew are left out. With 60,000 images, 100 devices and 2 shards per device every
    device gets 2 shards of 300 images, mostly of two classes.
    """
    y = _labels(labels)
    _check_devices(num_devices, len(y))
    if shards_per_device < 1:
        raise ValueError(f"shards_per_device must be >= 1, found {shards_per_device}")
    num_shards = num_devices * shards_per_device
    size = len(y) // num_shards if shard_size is None else shard_size
    if size < 1 or size * num_shards > len(y):
        raise ValueError(
            f"{num_devices} devices x {shards_per_device} shards x {size} samples "
            f"do not fit in {len(y)} samples"
        )
    rng = np.random.default_rng(seed)
    # Shuffle before the stable sort so which samples of a class share a shard is random.
    perm = rng.permutation(len(y))
    by_label = perm[np.argsort(y[perm], kind="stable")].astype(np.int64)
    available = len(y) // size
    cut = by_label[: available * size].reshape(available, size)
    drawn = rng.choice(available, size=num_shards, replace=False).reshape(num_devices, shards_per_device)
    return [np.sort(cut[row].ravel()) for row in drawn]


def dirichlet(
    labels: Sequence[int] | np.ndarray,
    num_devices: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
    max_attempts: int = 1000,
) -> IndexArrays:
    """Label-skewed split: each class is spread over devices by proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives each device a few dominant classes; large ``alpha`` (100) tends to IID.
    Every sample is assigned. As in NIID-Bench (Li et al., ICDE 2022), a device that already holds its
    fair share ``n / num_devices`` receives nothing more, and the draw is repeated until every device
    has at least ``min_size`` samples.
    """
    y = _labels(labels)
    _check_devices(num_devices, len(y))
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, found {alpha}")
    if min_size * num_devices > len(y):
        raise ValueError(f"cannot give {num_devices} devices {min_size} samples each from {len(y)} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    fair_share = len(y) / num_devices
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        sizes = np.zeros(num_devices, dtype=np.int64)
        for c in classes:
            members = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(num_devices, alpha)) * (sizes < fair_share)
            total = props.sum()
            if not np.isfinite(total) or total <= 0:  # underflow at tiny alpha: fall back to open devices
                props = (sizes < fair_share).astype(float)
                total = props.sum()
            cuts = (np.cumsum(props / total)[:-1] * len(members)).astype(np.int64)
            for dev, chunk in enumerate(np.split(members, cuts)):
                parts[dev].append(chunk)
                sizes[dev] += len(chunk)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ValueError(
        f"dirichlet(alpha={alpha}) gave some device fewer than {min_size} samples "
        f"in {max_attempts} attempts; "
        "raise alpha or lower min_size"
    )


def matching_test_indices(
    train_labels: Sequence[np.ndarray],
    test_labels: Sequence[int] | np.ndarray,
    num_test: int | Sequence[int],
    seed: int = 0,
) -> IndexArrays:
    """For each device, test indices whose label proportions match the device's train labels.

    ``num_test`` is one size for all devices or one per device. Each class's quota is its train share
    times the size, rounded by largest remainder so the quotas sum to the size exactly. Samples are
    drawn without replacement within a device and independently across devices: two devices may be
    evaluated on the same test image, but no test image is ever in anyone's train data.
    """
    pool_labels = _labels(test_labels)
    sizes = [num_test] * len(train_labels) if isinstance(num_test, (int, np.integer)) else list(num_test)
    if len(sizes) != len(train_labels):
        raise ValueError(f"num_test has {len(sizes)} entries for {len(train_labels)} devices")
    rng = np.random.default_rng(seed)
    pools = {int(c): np.flatnonzero(pool_labels == c) for c in np.unique(pool_labels)}
    empty = np.empty(0, dtype=np.int64)
    result = []
    for dev, (y, size) in enumerate(zip(train_labels, sizes)):
        classes, counts = np.unique(np.asarray(y), return_counts=True)
        if size == 0 or len(classes) == 0:
            result.append(empty)
            continue
        chosen = []
        for c, quota in zip(classes, largest_remainder(counts, int(size))):
            pool = pools.get(int(c), empty)
            if quota > len(pool):
                raise ValueError(
                    f"device {dev} needs {quota} test samples of class {c} but the test split has {len(pool)}"
                )
            chosen.append(rng.choice(pool, size=quota, replace=False))
        result.append(np.sort(np.concatenate(chosen)).astype(np.int64))
    return result


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` that sum to ``total`` (Hamilton's apportionment)."""
    w = np.asarray(weights, dtype=np.float64)
    if total < 0 or w.sum() <= 0:
        raise ValueError(f"cannot apportion {total} by weights {w}")
    exact = w / w.sum() * total
    floor = np.floor(exact).astype(np.int64)
    shortfall = total - int(floor.sum())
    # Stable sort on the negated remainders: ties go to the earlier entry, so the result is deterministic.
    floor[np.argsort(-(exact - floor), kind="stable")[:shortfall]] += 1
    return floor


def _labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, found {y.dtype} {y.shape}")
    return y


def _check_devices(num_devices: int, n: int) -> None:
    if num_devices < 1 or num_devices > n:
        raise ValueError(f"num_devices must be in [1, {n}] for {n} samples, found {num_devices}")
