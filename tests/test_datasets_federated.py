"""The data model and the per-device .npz file a device agent reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.federated import (
    DeviceData,
    FederatedDataset,
    load_device,
    safe_device_id,
    save_device,
    unique_device_ids,
)


def make_device(rng: np.random.Generator, int_inputs: bool = False) -> DeviceData:
    if int_inputs:
        x_train, x_test = rng.integers(0, 81, (12, 80)), rng.integers(0, 81, (5, 80))
    else:
        x_train = rng.random((12, 3, 128), dtype=np.float32)
        x_test = rng.random((5, 3, 128), dtype=np.float32)
    return DeviceData(
        device_id="f1",
        x_train=x_train,
        y_train=rng.integers(0, 14, 12),
        x_test=x_test,
        y_test=rng.integers(0, 14, 5),
        num_classes=81 if int_inputs else 14,
        meta={"vocab": "ab\n", "window": 128},
    )


@pytest.mark.parametrize("int_inputs", [False, True], ids=["float-windows", "int-sequences"])
def test_device_file_round_trips(tmp_path: Path, int_inputs: bool) -> None:
    dev = make_device(np.random.default_rng(0), int_inputs)
    path = save_device(dev, tmp_path / "sub" / "f1.npz")
    back = load_device(path)
    assert back.device_id == dev.device_id and back.num_classes == dev.num_classes and back.meta == dev.meta
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(back, key), getattr(dev, key))
        assert getattr(back, key).dtype == getattr(dev, key).dtype
    assert (back.num_train, back.num_test) == (12, 5)


def test_device_file_holds_no_pickled_objects(tmp_path: Path) -> None:
    path = save_device(make_device(np.random.default_rng(1)), tmp_path / "f1.npz")
    with np.load(path, allow_pickle=False) as npz:  # would raise on any object array
        assert all(npz[k].dtype != object for k in npz.files)


def test_save_needs_the_number_of_classes(tmp_path: Path) -> None:
    dev = make_device(np.random.default_rng(2))
    dev.num_classes = None
    with pytest.raises(ValueError, match="num_classes"):
        save_device(dev, tmp_path / "f1.npz")
    assert load_device(save_device(dev, tmp_path / "f1.npz", num_classes=20)).num_classes == 20


def test_save_refuses_inputs_a_device_could_not_read(tmp_path: Path) -> None:
    dev = make_device(np.random.default_rng(8))
    dev.x_test = dev.x_test.astype(np.float64)
    with pytest.raises(ValueError, match="x_test is float64; expected float32 or int64"):
        save_device(dev, tmp_path / "f1.npz")


def test_missing_device_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.npz.*does not exist"):
        load_device(tmp_path / "nope.npz")


def test_garbage_device_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(DatasetError, match=r"junk\.npz"):
        load_device(path)


def test_device_file_missing_a_key_says_which(tmp_path: Path) -> None:
    dev = make_device(np.random.default_rng(3))
    path = tmp_path / "partial.npz"
    np.savez(path, format_version=1, device_id="f1", num_classes=14, x_train=dev.x_train, y_train=dev.y_train)
    with pytest.raises(DatasetError, match=r"partial\.npz: device data file lacks x_test, y_test"):
        load_device(path)


def test_device_file_with_a_pickled_entry_is_refused(tmp_path: Path) -> None:
    dev = make_device(np.random.default_rng(4))
    path = tmp_path / "evil.npz"
    np.savez(
        path,
        format_version=1,
        device_id="f1",
        num_classes=14,
        x_train=np.array([{"payload": 1}], dtype=object),  # np.savez pickles object arrays
        y_train=dev.y_train,
        x_test=dev.x_test,
        y_test=dev.y_test,
    )
    with pytest.raises(DatasetError, match=r"evil\.npz.*not a plain array"):
        load_device(path)


def test_device_file_with_out_of_range_labels_is_refused(tmp_path: Path) -> None:
    dev = make_device(np.random.default_rng(5))
    dev.y_test[0] = 14
    with pytest.raises(DatasetError, match=r"y_test has labels outside \[0, 14\)"):
        load_device(save_device(dev, tmp_path / "f1.npz"))


def test_device_file_with_mismatched_lengths_is_refused(tmp_path: Path) -> None:
    dev = make_device(np.random.default_rng(6))
    path = tmp_path / "f1.npz"
    arrays = {"x_train": dev.x_train, "y_train": dev.y_train[:3], "x_test": dev.x_test, "y_test": dev.y_test}
    np.savez(path, format_version=1, device_id="f1", num_classes=14, **arrays)
    expected = r"f1\.npz: x_train has shape \(12, 3, 128\); expected \[3, \.\.\.\]"
    with pytest.raises(DatasetError, match=expected):
        load_device(path)


def test_device_data_rejects_inconsistent_arrays() -> None:
    with pytest.raises(ValueError, match="x_train has 3 samples but y_train has 2"):
        DeviceData("d", np.zeros((3, 4), np.float32), np.zeros(2, np.int64), np.zeros((0, 4)), np.zeros(0))


def test_federated_dataset_lookups_and_unique_ids() -> None:
    rng = np.random.default_rng(7)
    a, b = make_device(rng), make_device(rng)
    b.device_id = "m1"
    data = FederatedDataset("hmp", "natural", 14, (3, 128), np.float32, [a, b])
    assert data.num_devices == 2 and data.device("m1") is b
    assert data.label_counts(a).sum() == a.num_train and len(data.label_counts(a)) == 14
    with pytest.raises(ValueError, match="not unique"):
        FederatedDataset("hmp", "natural", 14, (3, 128), np.float32, [a, a])


def test_device_ids_are_topic_safe_and_unique() -> None:
    assert safe_device_id("First Citizen") == "First_Citizen"
    assert safe_device_id("a/b+c#") == "a_b_c"
    assert unique_device_ids(["LADY CAPULET", "LADY_CAPULET", "x"]) == ["LADY_CAPULET", "LADY_CAPULET-2", "x"]
    with pytest.raises(ValueError):
        safe_device_id("///")
