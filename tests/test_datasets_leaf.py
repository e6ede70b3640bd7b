"""LEAF JSON (FEMNIST and Shakespeare) on files written in LEAF's exact layout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fixtures.dataset_files import write_leaf_json

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.leaf import load_leaf
from fedmask.datasets.shakespeare import decode


def femnist_user(rng: np.random.Generator, n: int) -> tuple[list[list[float]], list[int]]:
    return rng.random((n, 784)).round(4).tolist(), rng.integers(0, 62, n).tolist()


@pytest.fixture
def femnist_dirs(tmp_path: Path) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(0)
    train = {
        "f0000_14": femnist_user(rng, 9),
        "f0001_41": femnist_user(rng, 5),
        "f0002_11": femnist_user(rng, 7),
    }
    test = {
        "f0000_14": femnist_user(rng, 2),
        "f0001_41": femnist_user(rng, 1),
        "f0003_99": femnist_user(rng, 3),
    }
    root = tmp_path / "femnist" / "data"
    # LEAF shards users over several files per split.
    write_leaf_json(root / "train" / "all_data_0_niid_0_keep_0_train_9.json", dict(list(train.items())[:2]))
    write_leaf_json(root / "train" / "all_data_1_niid_0_keep_0_train_9.json", dict(list(train.items())[2:]))
    write_leaf_json(root / "test" / "all_data_0_niid_0_keep_0_test_9.json", test)
    return root / "train", root / "test", {"train": train, "test": test}


def test_femnist_users_in_both_splits_become_devices(femnist_dirs: tuple[Path, Path, dict]) -> None:
    train_dir, test_dir, written = femnist_dirs
    data = load_leaf(train_dir, test_dir, "femnist")
    assert [d.device_id for d in data.devices] == ["f0000_14", "f0001_41"]  # f0002/f0003 lack a split
    assert data.num_classes == 62 and data.input_shape == (1, 28, 28)
    dev = data.device("f0000_14")
    x, y = written["train"]["f0000_14"]
    assert dev.x_train.shape == (9, 1, 28, 28) and dev.x_train.dtype == np.float32
    np.testing.assert_allclose(dev.x_train.reshape(9, -1), np.array(x, dtype=np.float32))
    assert dev.y_train.tolist() == y and dev.num_test == 2


def test_max_users_keeps_the_largest(femnist_dirs: tuple[Path, Path, dict]) -> None:
    train_dir, test_dir, _ = femnist_dirs
    assert [d.device_id for d in load_leaf(train_dir, test_dir, "femnist", max_users=1).devices] == [
        "f0000_14"
    ]


def test_shakespeare_leaf_strings_are_encoded(tmp_path: Path) -> None:
    text = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer " * 3
    xs = [text[i : i + 80] for i in range(0, 60, 3)]
    ys = [text[i + 80] for i in range(0, 60, 3)]
    user = "THE_TRAGEDY_OF_HAMLET_PRINCE_OF_DENMARK_HAMLET"
    write_leaf_json(tmp_path / "train" / "a.json", {user: (xs[:15], ys[:15])})
    write_leaf_json(tmp_path / "test" / "a.json", {user: (xs[15:], ys[15:])})
    data = load_leaf(tmp_path / "train", tmp_path / "test", "shakespeare")
    dev = data.devices[0]
    assert dev.x_train.shape == (15, 80) and dev.x_train.dtype == np.int64
    assert decode(dev.x_test[0]) == xs[15] and decode(dev.y_test) == "".join(ys[15:])
    assert data.meta["vocab"] == dev.meta["vocab"] and data.num_classes == 81


@pytest.mark.parametrize(
    ("doc_change", "problem"),
    [
        (lambda d: d.pop("user_data"), '"users", "num_samples" and "user_data"'),
        (lambda d: d["num_samples"].__setitem__(0, 99), "num_samples says 99"),
        (lambda d: d["user_data"]["u1"]["x"][0].append(0.5), "784 numbers"),
        (lambda d: d["user_data"]["u1"]["x"][0].__setitem__(0, 3.0), r"pixel values must be in \[0, 1\]"),
        (lambda d: d["user_data"]["u1"]["y"].__setitem__(0, 62), r"y must be integers in \[0, 62\)"),
    ],
    ids=["no-user-data", "count-mismatch", "ragged-x", "pixel-range", "label-range"],
)
def test_malformed_femnist_json_names_the_file(
    tmp_path: Path, doc_change: Callable[[dict], object], problem: str
) -> None:
    rng = np.random.default_rng(1)
    write_leaf_json(tmp_path / "test" / "t.json", {"u1": femnist_user(rng, 2)})
    bad = write_leaf_json(tmp_path / "train" / "bad.json", {"u1": femnist_user(rng, 2)})
    doc = json.loads(bad.read_text())
    doc_change(doc)
    bad.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=problem) as err:
        load_leaf(tmp_path / "train", tmp_path / "test", "femnist")
    assert err.value.path == str(bad)


def test_wrong_length_shakespeare_sequence_is_reported(tmp_path: Path) -> None:
    write_leaf_json(tmp_path / "train.json", {"u": (["too short"], ["x"])})
    write_leaf_json(tmp_path / "test.json", {"u": (["a" * 80], ["b"])})
    with pytest.raises(DatasetError, match=r"train\.json: user 'u': each x must be a string of 80"):
        load_leaf(tmp_path / "train.json", tmp_path / "test.json", "shakespeare")


def test_missing_and_disjoint_splits_are_reported(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no LEAF JSON found"):
        load_leaf(tmp_path / "train", tmp_path / "test", "femnist")
    rng = np.random.default_rng(2)
    write_leaf_json(tmp_path / "train" / "a.json", {"u1": femnist_user(rng, 2)})
    write_leaf_json(tmp_path / "test" / "a.json", {"u2": femnist_user(rng, 2)})
    with pytest.raises(DatasetError, match="no user has both train and test samples"):
        load_leaf(tmp_path / "train", tmp_path / "test", "femnist")
    (tmp_path / "train" / "b.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"b\.json: not valid JSON"):
        load_leaf(tmp_path / "train", tmp_path / "test", "femnist")
