"""Named workloads, data-root resolution, synthetic test sets, and the `fedmask data` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.dataset_files import write_cifar_tree, write_leaf_json, write_mnist_tree

from fedmask.cli import main
from fedmask.datasets.errors import DatasetError
from fedmask.datasets.federated import load_device
from fedmask.datasets.partition import largest_remainder
from fedmask.datasets.workloads import WORKLOADS, default_data_root, load_workload


def test_registry_names_the_model_zoo_architecture_for_each_workload() -> None:
    architectures = {name: w.architecture for name, w in WORKLOADS.items()}
    assert architectures == {
        "hmp": "har_cnn",
        "fashion_mnist": "femnist_cnn",
        "mnist": "femnist_cnn",
        "emnist": "femnist_cnn",
        "shakespeare": "char_lstm_small",
        "femnist_leaf": "femnist_cnn",
        "shakespeare_leaf": "char_lstm_small",
        "cifar10": "conv4",
        "uci_har": "har_cnn",
    }
    assert WORKLOADS["fashion_mnist"].default_partition == "shards"


def assert_test_matches_train_labels(data, num_classes: int) -> None:
    for dev in data.devices:
        train_counts = np.bincount(dev.y_train, minlength=num_classes)
        expected = largest_remainder(train_counts, dev.num_test)
        assert np.array_equal(np.bincount(dev.y_test, minlength=num_classes), expected), dev.device_id


def test_mnist_shards_from_an_explicit_root(tmp_path: Path) -> None:
    write_mnist_tree(tmp_path / "mnist", np.random.default_rng(0), n_train=400, n_test=100)
    data = load_workload("mnist", tmp_path, num_devices=10, seed=1, shard_size=20)
    assert data.num_devices == 10 and data.partition == "shards"
    assert all(d.num_train == 40 and d.num_test == 10 for d in data.devices)  # test share = 100/400 of train
    assert data.devices[0].x_train.dtype == np.float32 and data.devices[0].x_train.max() <= 1.0
    assert data.meta["architecture"] == "femnist_cnn"
    assert_test_matches_train_labels(data, 10)


def test_dirichlet_and_iid_partitions_of_cifar10(tmp_path: Path) -> None:
    write_cifar_tree(tmp_path, np.random.default_rng(1), per_batch=40)
    data = load_workload("cifar10", tmp_path, partition="dirichlet", num_devices=4, alpha=0.3, min_size=5)
    assert sum(d.num_train for d in data.devices) == 200 and data.input_shape == (3, 32, 32)
    assert_test_matches_train_labels(data, 10)
    iid = load_workload("cifar10", tmp_path, partition="iid", num_devices=5, test_per_device=8)
    assert all(d.num_train == 40 and d.num_test == 8 for d in iid.devices)
    assert iid.meta["label_names"][0] == "airplane"


def test_env_data_root_and_leaf_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    users = {"f0001_41": (rng.random((3, 784)).tolist(), [1, 2, 3])}
    write_leaf_json(tmp_path / "femnist" / "data" / "train" / "x.json", users)
    write_leaf_json(tmp_path / "femnist" / "data" / "test" / "x.json", users)
    monkeypatch.setenv("FEDMASK_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    data = load_workload("femnist_leaf")
    assert [d.device_id for d in data.devices] == ["f0001_41"]


def test_bad_requests_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown workload 'imagenet'"):
        load_workload("imagenet")
    with pytest.raises(ValueError, match="supports partitions natural, not 'shards'"):
        load_workload("hmp", tmp_path, partition="shards")
    with pytest.raises(DatasetError, match=r"no cifar10 data found; looked for test_batch in .*absent"):
        load_workload("cifar10", tmp_path / "absent")
    write_cifar_tree(tmp_path, np.random.default_rng(5), per_batch=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").unlink()  # found, but incomplete
    with pytest.raises(DatasetError, match="missing CIFAR-10 batch files data_batch_2"):
        load_workload("cifar10", tmp_path)


def test_real_hmp_workload(hmp_root: Path) -> None:
    data = load_workload("hmp", hmp_root)
    assert data.num_devices == 16 and data.meta["architecture"] == "har_cnn"
    assert all(d.num_test > 0 for d in data.devices)
    smaller = load_workload("hmp", hmp_root, num_devices=3)
    largest = sorted(data.devices, key=lambda d: -d.num_train)[:3]
    assert {d.device_id for d in smaller.devices} == {d.device_id for d in largest}


def test_real_fashion_mnist_default_shards(fashion_mnist_root: Path) -> None:
    data = load_workload("fashion_mnist", fashion_mnist_root)
    assert data.num_devices == 100
    assert all(d.num_train == 600 and d.num_test == 100 for d in data.devices)
    assert max(len(np.unique(d.y_train)) for d in data.devices) <= 2  # shards of 300 never mix classes
    assert_test_matches_train_labels(data, 10)


def test_cli_partition_writes_device_files_and_a_manifest(tmp_path: Path) -> None:
    write_mnist_tree(tmp_path / "data" / "mnist", np.random.default_rng(3), n_train=200, n_test=50)
    out = tmp_path / "out"
    argv = [
        "data",
        "partition",
        "--dataset",
        "mnist",
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    code = main([*argv, "--devices", "5", "--partition", "iid", "--seed", "7"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "mnist" and manifest["partition"] == "iid" and manifest["meta"]["seed"] == 7
    assert len(manifest["devices"]) == 5
    for entry in manifest["devices"]:
        dev = load_device(out / entry["file"])
        assert dev.device_id == entry["device_id"] and dev.num_classes == manifest["num_classes"] == 10
        assert (dev.num_train, dev.num_test) == (entry["num_train"], entry["num_test"]) == (40, 10)
        assert entry["train_label_counts"] == np.bincount(dev.y_train, minlength=10).tolist()
    assert main([*argv, "--devices", "5"]) == 2  # refuses to mix with an earlier run
    assert main([*argv, "--devices", "4", "--overwrite"]) == 0


def test_cli_info_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_mnist_tree(tmp_path / "mnist", np.random.default_rng(4), n_train=200, n_test=50)
    assert main(["data", "info", "--dataset", "mnist", "--data-root", str(tmp_path), "--devices", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dataset mnist  partition shards  devices 4  classes 10")
    rows = [line.split() for line in lines[2:-1]]
    assert [r[0] for r in rows] == ["device000", "device001", "device002", "device003"]
    # 200 train images in 4 devices x 2 shards; each device's test share is round(50 * 50 / 200).
    assert all(int(r[1]) == 50 and int(r[2]) == round(50 * 50 / 200) for r in rows)
    assert lines[-1].split()[1:] == [str(sum(int(r[1]) for r in rows)), str(sum(int(r[2]) for r in rows))]


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["data", "info", "--dataset", "mnist", "--data-root", str(tmp_path / "nope")]) == 1
    assert "no mnist data found" in caplog.text
    assert main(["data", "info", "--dataset", "hmp", "--param", "stride"]) == 1
    assert "expected KEY=VALUE" in caplog.text
