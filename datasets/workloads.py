"""Named workloads: which data, which partition, which model-zoo architecture.

``load_workload("hmp")`` is the one call a benchmark or the simulator needs. Data are found under a
data root: the ``data_root`` argument, else ``FEDMASK_DATA_ROOT``, else ``<project root>/../shared/datasets``
(Fashion-MNIST also falls back to ``/usr/share/datasets/fashion-mnist``, where Debian installs it).
Within the root each workload looks in the usual places (`Workload.locations`, then the root itself)
and takes the first that holds its files (`Workload.probe`); when none does, the error names them all.

For natural partitions, ``num_devices`` keeps the devices with the most train samples (Shakespeare:
the most speeches; ties by id), which keeps CPU runs small without changing anyone's data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.federated import FederatedDataset
from fedmask.datasets.synthetic import SYNTHETIC_PARTITIONS, federate_central

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")

Loader = Callable[..., FederatedDataset]


def default_data_root() -> Path:
    """``FEDMASK_DATA_ROOT`` if set, else ``<project root>/../shared/datasets``."""
    env = os.environ.get("FEDMASK_DATA_ROOT")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "datasets"


@dataclass(frozen=True)
class Workload:
    """A registered workload and where its data may live."""

    name: str
    architecture: str  # model-zoo name of the default network
    partitions: tuple[str, ...]  # the first is the default
    default_devices: int | None  # synthetic partitions only; natural ones keep every device
    locations: tuple[str, ...]  # relative to the data root
    probe: str  # glob that matches inside the data folder; "" when the data is a single file
    description: str
    loader: Loader  # (path, partition, num_devices, seed, **kw) -> FederatedDataset

    @property
    def default_partition(self) -> str:
        return self.partitions[0]


def candidate_paths(workload: Workload, data_root: Path | None = None) -> list[Path]:
    """Where ``workload``'s data may be, in the order they are tried (the root itself last)."""
    root = data_root if data_root is not None else default_data_root()
    paths = [root / rel for rel in workload.locations] + [root]
    if workload.name == "fashion_mnist":
        paths.append(FASHION_MNIST_SYSTEM)
    return paths


def holds_data(workload: Workload, path: Path) -> bool:
    """Whether ``path`` looks like ``workload``'s data (the loader then validates it fully)."""
    if not workload.probe:
        return path.is_file()
    return path.is_dir() and next(path.glob(workload.probe), None) is not None


def _locate(workload: Workload, data_root: Path | None) -> Path:
    paths = candidate_paths(workload, data_root)
    for path in paths:
        if holds_data(workload, path):
            return path
    where = data_root if data_root is not None else default_data_root()
    raise DatasetError(
        where,
        f"no {workload.name} data found; looked for {workload.probe or 'a file'} "
        f"in {', '.join(map(str, paths))}",
    )


def _keep_largest(data: FederatedDataset, num_devices: int | None) -> FederatedDataset:
    if num_devices is None or num_devices >= data.num_devices:
        return data
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, found {num_devices}")
    keep = {
        d.device_id for d in sorted(data.devices, key=lambda d: (-d.num_train, d.device_id))[:num_devices]
    }
    data.devices = [d for d in data.devices if d.device_id in keep]
    return data


def _hmp(path: Path, partition: str, num_devices: int | None, seed: int, **kw: Any) -> FederatedDataset:
    from fedmask.datasets.hmp import load_hmp

    return _keep_largest(load_hmp(path, seed=seed, **kw), num_devices)


def _shakespeare(
    path: Path, partition: str, num_devices: int | None, seed: int, **kw: Any
) -> FederatedDataset:
    from fedmask.datasets.shakespeare import load_shakespeare

    # Caps keep a CPU run small: LEAF's stride-1 sequences are highly redundant anyway.
    options = {"max_train_per_speaker": 1000, "max_test_per_speaker": 250, **kw}
    return load_shakespeare(path, max_speakers=num_devices, seed=seed, **options)


def _leaf(kind: str) -> Loader:
    def load(path: Path, partition: str, num_devices: int | None, seed: int, **kw: Any) -> FederatedDataset:
        from fedmask.datasets.leaf import load_leaf

        del seed  # LEAF files are already split
        return load_leaf(path / "train", path / "test", kind, max_users=num_devices, **kw)

    return load


def _uci_har(path: Path, partition: str, num_devices: int | None, seed: int, **kw: Any) -> FederatedDataset:
    from fedmask.datasets.uci_har import load_uci_har

    del seed  # the split rule is deterministic
    return _keep_largest(load_uci_har(path, **kw), num_devices)


def _idx(name: str, emnist_default: str | None = None) -> Loader:
    def load(path: Path, partition: str, num_devices: int | None, seed: int, **kw: Any) -> FederatedDataset:
        from fedmask.datasets.idx import load_idx

        split = kw.pop("emnist_split", emnist_default)
        meta = {"emnist_split": split} if split else {}
        return federate_central(name, load_idx(path, split), partition, num_devices, seed, meta=meta, **kw)

    return load


def _cifar10(path: Path, partition: str, num_devices: int | None, seed: int, **kw: Any) -> FederatedDataset:
    from fedmask.datasets.cifar10 import label_names, load_cifar10

    meta = {"label_names": label_names(path)}
    return federate_central("cifar10", load_cifar10(path), partition, num_devices, seed, meta=meta, **kw)


_NATURAL = ("natural",)
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="hmp",
            architecture="har_cnn",
            partitions=_NATURAL,
            default_devices=None,
            locations=("hmp/HMP_Dataset", "HMP_Dataset"),
            probe="*/Accelerometer-*.txt",
            description="HMP wrist accelerometer, 14 activities, one device per volunteer (16)",
            loader=_hmp,
        ),
        Workload(
            name="fashion_mnist",
            architecture="femnist_cnn",
            partitions=SYNTHETIC_PARTITIONS,
            default_devices=100,
            locations=("fashion-mnist", "fashion_mnist"),
            probe="train-images-idx3-ubyte*",
            description="Fashion-MNIST, 10 classes; shards: 100 devices x 2 shards x 300 images",
            loader=_idx("fashion_mnist"),
        ),
        Workload(
            name="mnist",
            architecture="femnist_cnn",
            partitions=SYNTHETIC_PARTITIONS,
            default_devices=100,
            locations=("mnist", "MNIST/raw"),
            probe="train-images-idx3-ubyte*",
            description="MNIST IDX files, 10 classes",
            loader=_idx("mnist"),
        ),
        Workload(
            name="emnist",
            architecture="femnist_cnn",
            partitions=SYNTHETIC_PARTITIONS,
            default_devices=100,
            locations=("emnist/gzip", "emnist", "gzip"),
            probe="emnist-*-train-images-idx3-ubyte*",
            description="EMNIST IDX files (split 'byclass' by default, 62 classes)",
            loader=_idx("emnist", "byclass"),
        ),
        Workload(
            name="shakespeare",
            architecture="char_lstm_small",
            partitions=_NATURAL,
            default_devices=None,
            locations=("shakespeare/tinyshakespeare.txt", "tinyshakespeare.txt"),
            probe="",
            description="Shakespeare text, next character, one device per speaker with >= 20 speeches",
            loader=_shakespeare,
        ),
        Workload(
            name="femnist_leaf",
            architecture="femnist_cnn",
            partitions=_NATURAL,
            default_devices=None,
            locations=("femnist/data", "femnist"),
            probe="train/*.json",
            description="FEMNIST in LEAF JSON (train/ and test/ folders), one device per writer",
            loader=_leaf("femnist"),
        ),
        Workload(
            name="shakespeare_leaf",
            architecture="char_lstm_small",
            partitions=_NATURAL,
            default_devices=None,
            locations=("shakespeare/data", "shakespeare_leaf"),
            probe="train/*.json",
            description="Shakespeare in LEAF JSON (train/ and test/ folders), one device per role",
            loader=_leaf("shakespeare"),
        ),
        Workload(
            name="cifar10",
            architecture="conv4",
            partitions=SYNTHETIC_PARTITIONS,
            default_devices=100,
            locations=("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
            probe="test_batch",
            description="CIFAR-10 python batches, 10 classes",
            loader=_cifar10,
        ),
        Workload(
            name="uci_har",
            architecture="har_cnn",
            partitions=_NATURAL,
            default_devices=None,
            locations=("UCI HAR Dataset", "uci_har/UCI HAR Dataset", "uci_har"),
            probe="train/y_train.txt",
            description="UCI-HAR body acceleration windows [3, 128], one device per subject (30)",
            loader=_uci_har,
        ),
    )
}


def load_workload(
    name: str,
    data_root: Path | None = None,
    *,
    partition: str | None = None,
    num_devices: int | None = None,
    seed: int = 0,
    **kw: Any,
) -> FederatedDataset:
    """Load workload ``name`` (a key of `WORKLOADS`); ``kw`` go to its loader or partitioner.

    Examples of ``kw``: ``stride``/``test_fraction`` (hmp), ``min_speeches``/``max_train_per_speaker``
    (shakespeare), ``alpha``/``shards_per_device``/``shard_size``/``test_per_device`` (synthetic
    partitions), ``emnist_split`` (emnist).
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    workload = WORKLOADS[name]
    chosen = partition or workload.default_partition
    if chosen not in workload.partitions:
        raise ValueError(
            f"workload {name!r} supports partitions {', '.join(workload.partitions)}, not {chosen!r}"
        )
    if num_devices is None and chosen in SYNTHETIC_PARTITIONS:
        num_devices = workload.default_devices
    path = _locate(workload, Path(data_root) if data_root is not None else None)
    data = workload.loader(path, chosen, num_devices, seed, **kw)
    # A fresh dict: the loaders share theirs with the devices, which need not know the run's choices.
    data.meta = {**data.meta, "workload": name, "architecture": workload.architecture, "seed": seed}
    return data
