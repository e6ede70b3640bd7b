"""CIFAR-10 python batches: the official Python 2 pickle layout, read by a restricted unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from fixtures.dataset_files import cifar_batch_bytes, write_cifar_tree

from fedmask.datasets.cifar10 import batch_arrays, label_names, load_cifar10, read_batch
from fedmask.datasets.errors import DatasetError


def test_batches_load_exactly_as_written(tmp_path: Path) -> None:
    written = write_cifar_tree(tmp_path, np.random.default_rng(0), per_batch=20)
    split = load_cifar10(tmp_path)
    assert split.x_train.shape == (100, 3, 32, 32) and split.x_train.dtype == np.uint8
    assert np.array_equal(split.x_train.reshape(100, -1), written["x_train"])
    assert np.array_equal(split.y_train, written["y_train"]) and split.y_train.dtype == np.int64
    assert np.array_equal(split.x_test.reshape(20, -1), written["x_test"])
    assert split.num_classes == 10
    assert label_names(tmp_path)[:2] == ["airplane", "automobile"]


def test_generated_batches_match_what_the_standard_unpickler_reads(tmp_path: Path) -> None:
    # Cross-check the format with Python's own (unrestricted) reader, as CIFAR's instructions use it.
    data = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    raw = cifar_batch_bytes(data, [3, 1, 4, 1], b"training batch 1 of 5")
    reference = pickle.loads(raw, encoding="bytes")
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    ours = read_batch(path)
    assert np.array_equal(ours["data"], reference[b"data"]) and ours["labels"] == reference[b"labels"]
    assert ours["batch_label"] == b"training batch 1 of 5"


def test_a_python3_protocol2_repickle_also_loads(tmp_path: Path) -> None:
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [0, 9]}, protocol=2))  # bytes via _codecs.encode
    x, y = batch_arrays(path)
    assert np.array_equal(x.reshape(2, -1), data) and y.tolist() == [0, 9]


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_before_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _RunsCode(marker)}, protocol=2))
    with pytest.raises(
        DatasetError, match=r"data_batch_1: not a plain CIFAR-10 batch: refusing to load posix\.system"
    ):
        read_batch(path)
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.array([1, "x"], dtype=object)}, protocol=2))
    with pytest.raises(DatasetError, match="is not a plain numeric type"):
        read_batch(path)


def test_wrong_shapes_and_missing_files_are_named(tmp_path: Path) -> None:
    write_cifar_tree(tmp_path, np.random.default_rng(2), per_batch=4)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(cifar_batch_bytes(np.zeros((2, 100), np.uint8), [0, 1], b"bad"))
    with pytest.raises(
        DatasetError, match=r"test_batch: data must be a uint8 array \[N, 3072\], found uint8 \(2, 100\)"
    ):
        load_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [0, 10], b"bad"))
    with pytest.raises(DatasetError, match=r"test_batch: labels outside \[0, 10\)"):
        load_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing CIFAR-10 batch files data_batch_3"):
        load_cifar10(tmp_path)
    with pytest.raises(DatasetError, match="no CIFAR-10 batches here"):
        load_cifar10(tmp_path / "elsewhere")
    (folder / "data_batch_1").write_bytes(b"\x80\x02}(U\x04data")  # truncated
    with pytest.raises(DatasetError, match="data_batch_1: not a readable CIFAR-10 pickle"):
        read_batch(folder / "data_batch_1")
