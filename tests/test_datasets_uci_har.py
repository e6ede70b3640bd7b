"""UCI-HAR text files: parsing, one device per subject, and the split by activity bout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures.dataset_files import write_uci_har_tree

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.uci_har import load_uci_har, read_split, split_subject_windows

# Subjects 1 and 3 in the official train split, 2 in test; (activity 1..6, windows) bouts in order.
BOUTS = {
    "train": {1: [(5, 6), (4, 4), (1, 2), (2, 5)], 3: [(6, 8), (1, 3)]},
    "test": {2: [(3, 5), (5, 1), (4, 7)]},
}


@pytest.fixture
def har_root(tmp_path: Path) -> tuple[Path, dict]:
    written = write_uci_har_tree(tmp_path, np.random.default_rng(0), BOUTS)
    return tmp_path, written


def test_split_files_parse_to_the_written_values(har_root: tuple[Path, dict]) -> None:
    root, written = har_root
    x, labels, subjects = read_split(root, "train")
    assert x.shape == (28, 3, 128) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 1], written["train"]["body_acc_y"], rtol=1e-6)
    assert np.array_equal(labels, written["train"]["labels"] - 1)
    assert np.array_equal(subjects, written["train"]["subjects"])
    features, _, _ = read_split(root / "UCI HAR Dataset", "test", features=True)
    np.testing.assert_allclose(features, written["test"]["features"], rtol=1e-6)


def test_bout_split_keeps_overlapping_windows_apart() -> None:
    labels = np.array([4] * 6 + [3] * 4 + [0] * 2 + [1] * 5)
    train, test = split_subject_windows(labels, test_fraction=0.25)
    assert not set(train) & set(test)
    # Adjacent windows share half their samples: a train and a test window may touch only across bouts.
    for t in test:
        for neighbour in (t - 1, t + 1):
            assert neighbour not in train or labels[neighbour] != labels[t]
    # Per bout: 6 -> 2 test (round 1.5), 4 -> 1, 2 -> none (too short), 5 -> 1; one gap window each.
    assert test.tolist() == [4, 5, 9, 16]
    assert len(train) == len(labels) - len(test) - 3


def test_one_device_per_subject_pooling_both_official_splits(har_root: tuple[Path, dict]) -> None:
    root, written = har_root
    data = load_uci_har(root)
    assert [d.device_id for d in data.devices] == ["subject01", "subject02", "subject03"]
    assert data.input_shape == (3, 128) and data.num_classes == 6
    dev = data.device("subject02")
    expected_train, expected_test = split_subject_windows(written["test"]["labels"] - 1)
    np.testing.assert_allclose(dev.x_test[:, 0], written["test"]["body_acc_x"][expected_test], rtol=1e-6)
    assert np.array_equal(dev.y_train, written["test"]["labels"][expected_train] - 1)
    gyro = load_uci_har(root, signals=("body_gyro_x", "total_acc_z"))
    assert gyro.input_shape == (2, 128)


def test_malformed_and_missing_files_are_named(har_root: tuple[Path, dict]) -> None:
    root, _ = har_root
    signal = root / "UCI HAR Dataset" / "train" / "Inertial Signals" / "body_acc_z_train.txt"
    lines = signal.read_text().splitlines()
    signal.write_text("\n".join([*lines[:-1], lines[-1][:-16]]) + "\n")  # drop one number
    with pytest.raises(DatasetError, match=r"body_acc_z_train\.txt: expected 128 numbers per row"):
        load_uci_har(root)
    signal.write_text("\n".join([*lines[:-1], lines[-1].replace("e", "x", 1)]) + "\n")
    with pytest.raises(
        DatasetError, match=r"body_acc_z_train\.txt: expected rows of 128 numbers; found other text"
    ):
        load_uci_har(root)
    signal.unlink()
    with pytest.raises(DatasetError, match=r"body_acc_z_train\.txt: UCI-HAR file does not exist"):
        load_uci_har(root)
    with pytest.raises(DatasetError, match="no UCI-HAR data here"):
        load_uci_har(root / "nowhere")


def test_label_and_subject_files_must_agree(har_root: tuple[Path, dict]) -> None:
    root, _ = har_root
    y_file = root / "UCI HAR Dataset" / "test" / "y_test.txt"
    y_file.write_text("3\n" * 5)
    with pytest.raises(DatasetError, match=r"y_test\.txt: 5 rows but subject_test\.txt has 13"):
        load_uci_har(root)
    y_file.write_text("7\n" * 13)
    with pytest.raises(DatasetError, match=r"y_test\.txt: activity labels must be 1\.\.6"):
        load_uci_har(root)
