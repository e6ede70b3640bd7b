"""IDX loader (MNIST, Fashion-MNIST, EMNIST) on generated files and on the installed Fashion-MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from fixtures.dataset_files import idx_bytes, write_idx, write_mnist_tree

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.idx import load_idx, parse_idx, read_idx


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_mnist_tree_loads_exactly(tmp_path: Path, gz: bool) -> None:
    written = write_mnist_tree(tmp_path, np.random.default_rng(0), gz=gz)
    split = load_idx(tmp_path)
    assert split.x_train.shape == (120, 1, 28, 28) and split.x_train.dtype == np.uint8
    assert np.array_equal(split.x_train[:, 0], written["x_train"])
    assert np.array_equal(split.y_test, written["y_test"]) and split.y_test.dtype == np.int64
    assert split.num_classes == 10


def test_emnist_images_are_transposed_upright(tmp_path: Path) -> None:
    written = write_mnist_tree(tmp_path, np.random.default_rng(1), num_classes=47, emnist_split="balanced")
    split = load_idx(tmp_path, emnist_split="balanced")
    assert np.array_equal(split.x_train[:, 0], written["x_train"].transpose(0, 2, 1))
    assert np.array_equal(split.y_train, written["y_train"]) and split.num_classes == 47


def test_emnist_letters_labels_are_shifted_to_start_at_zero(tmp_path: Path) -> None:
    written = write_mnist_tree(tmp_path, np.random.default_rng(5), num_classes=26, emnist_split="letters")
    for split in ("train", "test"):  # the letters files label a..z as 1..26
        write_idx(tmp_path / f"emnist-letters-{split}-labels-idx1-ubyte.gz", written[f"y_{split}"] + 1)
    split = load_idx(tmp_path, emnist_split="letters")
    assert np.array_equal(split.y_test, written["y_test"]) and split.num_classes == 26
    write_idx(tmp_path / "emnist-letters-test-labels-idx1-ubyte.gz", written["y_test"])  # a 0 label
    with pytest.raises(DatasetError, match=r"emnist-letters-test-labels.*labels outside \[0, 26\)"):
        load_idx(tmp_path, emnist_split="letters")


def test_idx_header_is_validated(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match="magic number"):
        parse_idx(b"\x01" + good[1:], source="x.idx")
    with pytest.raises(DatasetError, match="unknown IDX type code 0x07"):
        parse_idx(good[:2] + b"\x07" + good[3:])
    with pytest.raises(DatasetError, match=r"size mismatch: header says shape \(2, 28, 28\)"):
        parse_idx(good[:-5])
    assert parse_idx(good).shape == (2, 28, 28)


def test_a_truncated_gzip_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:40])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: cannot decompress"):
        read_idx(path)


def test_missing_files_are_named_with_what_was_expected(tmp_path: Path) -> None:
    write_mnist_tree(tmp_path, np.random.default_rng(2))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"missing IDX file: expected t10k-labels-idx1-ubyte\[\.gz\]"):
        load_idx(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_idx(tmp_path / "nowhere")


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    write_mnist_tree(tmp_path, np.random.default_rng(3))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(DatasetError, match=r"120 images but train-labels-idx1-ubyte\.gz has 7 labels"):
        load_idx(tmp_path)


def test_labels_file_with_image_dimensions_is_refused(tmp_path: Path) -> None:
    write_mnist_tree(tmp_path, np.random.default_rng(4))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((120, 1), np.uint8))
    with pytest.raises(DatasetError, match="2 dimensions; expected 1"):
        load_idx(tmp_path)


def test_real_fashion_mnist(fashion_mnist_root: Path) -> None:
    split = load_idx(fashion_mnist_root)
    assert split.x_train.shape == (60_000, 1, 28, 28) and split.x_test.shape == (10_000, 1, 28, 28)
    assert split.num_classes == 10
    # Fashion-MNIST is balanced: every class has the same count in each split.
    assert len(set(np.bincount(split.y_train).tolist())) == 1
    assert len(set(np.bincount(split.y_test).tolist())) == 1
    assert split.x_train.max() > 200  # raw bytes, not pre-scaled
