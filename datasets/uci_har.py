"""UCI-HAR ("Human Activity Recognition Using Smartphones", Anguita et al., 2013) text files.

Layout of ``UCI HAR Dataset/``: for ``split`` in ``train``/``test``, ``<split>/subject_<split>.txt`` (one
subject id 1..30 per window), ``<split>/y_<split>.txt`` (activity 1..6 per window),
``<split>/X_<split>.txt`` (561 features per window) and ``<split>/Inertial Signals/<signal>_<split>.txt``
(128 samples per window at 50 Hz, 50% overlap) for the nine signals in `SIGNALS`.

The official split puts each subject wholly in train or test, which does not suit personalized FL, so
both are pooled and each subject (device) is split again. Rule (`split_subject_windows`): the windows
of a subject, in file order, form bouts of consecutive windows with the same activity; the last
``test_fraction`` of each bout (at least one window) goes to test, the rest to train, and the window
between them is dropped because consecutive windows share half their samples. Bouts shorter than three
windows go to train.
"""

from __future__ import annotations

import warnings
from os import PathLike
from pathlib import Path

import numpy as np

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.federated import DeviceData, FederatedDataset

SIGNALS = tuple(f"{kind}_{axis}" for kind in ("body_acc", "body_gyro", "total_acc") for axis in "xyz")
BODY_ACC = ("body_acc_x", "body_acc_y", "body_acc_z")
WINDOW = 128
NUM_FEATURES = 561
ACTIVITIES = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying")
FOLDER_NAME = "UCI HAR Dataset"


def read_matrix(path: Path, columns: int) -> np.ndarray:
    """A whitespace-separated text matrix with ``columns`` numbers per row, as float32."""
    if not path.is_file():
        raise DatasetError(path, "UCI-HAR file does not exist")
    text = path.read_bytes().strip()
    if not text:
        return np.empty((0, columns), dtype=np.float32)
    with warnings.catch_warnings():
        # NumPy reports unparsable text as a DeprecationWarning and returns what it read so far.
        warnings.simplefilter("error", DeprecationWarning)
        try:
            values = np.fromstring(text, dtype=np.float32, sep=" ")
        except (DeprecationWarning, ValueError) as exc:
            raise DatasetError(path, f"expected rows of {columns} numbers; found other text") from exc
    rows = sum(1 for line in text.splitlines() if line.strip())
    if values.size != rows * columns:
        raise DatasetError(
            path, f"expected {columns} numbers per row, found {values.size} numbers in {rows} rows"
        )
    return values.reshape(rows, columns)


def find_root(root: str | PathLike[str]) -> Path:
    """``root`` or ``root/UCI HAR Dataset``, whichever holds ``train/`` and ``test/``."""
    base = Path(root)
    for folder in (base, base / FOLDER_NAME):
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return folder
    raise DatasetError(
        base, f"no UCI-HAR data here (expected '{FOLDER_NAME}/' with train/ and test/ folders)"
    )


def read_split(
    root: str | PathLike[str], split: str, signals: tuple[str, ...] = BODY_ACC, features: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, labels, subjects)`` of one official split.

    ``x`` is ``[N, len(signals), 128]`` raw signals, or ``[N, 561]`` features with ``features=True``;
    labels are 0..5 and subjects the original ids.
    """
    folder = find_root(root) / split
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown:
        raise ValueError(f"unknown UCI-HAR signals {unknown}; expected some of {', '.join(SIGNALS)}")
    subjects = _read_ints(folder / f"subject_{split}.txt")
    labels = _read_ints(folder / f"y_{split}.txt")
    if labels.size and (labels.min() < 1 or labels.max() > len(ACTIVITIES)):
        raise DatasetError(folder / f"y_{split}.txt", f"activity labels must be 1..{len(ACTIVITIES)}")
    if features:
        parts = [(folder / f"X_{split}.txt", read_matrix(folder / f"X_{split}.txt", NUM_FEATURES))]
    else:
        signal_dir = folder / "Inertial Signals"
        parts = [(p, read_matrix(p, WINDOW)) for p in (signal_dir / f"{s}_{split}.txt" for s in signals)]
    for path, matrix in [(folder / f"y_{split}.txt", labels), *parts]:
        if len(matrix) != len(subjects):
            raise DatasetError(path, f"{len(matrix)} rows but subject_{split}.txt has {len(subjects)}")
    x = parts[0][1] if features else np.stack([m for _, m in parts], axis=1)
    return x, labels - 1, subjects


def _read_ints(path: Path) -> np.ndarray:
    values = read_matrix(path, 1).ravel()
    if not np.array_equal(values, np.round(values)):
        raise DatasetError(path, "expected one integer per row")
    return values.astype(np.int64)


def split_subject_windows(labels: np.ndarray, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Train and test positions for one subject's windows (in recording order); see the module docstring."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), found {test_fraction}")
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    ends = np.r_[starts[1:], len(labels)]
    train, test = [], []
    for start, end in zip(starts, ends):
        length = end - start
        if length < 3:
            train.append(np.arange(start, end))
            continue
        n_test = min(length - 2, max(1, round(test_fraction * length)))
        train.append(np.arange(start, end - n_test - 1))  # end - n_test - 1 is the dropped boundary window
        test.append(np.arange(end - n_test, end))
    return _concat_indices(train), _concat_indices(test)


def _concat_indices(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def load_uci_har(
    root: str | PathLike[str],
    *,
    signals: tuple[str, ...] = BODY_ACC,
    features: bool = False,
    test_fraction: float = 0.25,
) -> FederatedDataset:
    """UCI-HAR as a federation, one device per subject (``subject01`` ...).

    Inputs are ``[N, len(signals), 128]`` float32 (body acceleration x, y, z in g by default) or, with
    ``features=True``, the 561 engineered features.
    """
    halves = [read_split(root, split, signals, features) for split in ("train", "test")]
    x = np.concatenate([h[0] for h in halves])
    labels = np.concatenate([h[1] for h in halves])
    subjects = np.concatenate([h[2] for h in halves])
    devices = []
    meta = {"activities": list(ACTIVITIES), "signals": [] if features else list(signals)}
    for subject in np.unique(subjects):
        rows = np.flatnonzero(subjects == subject)  # file order = recording order within a subject
        train, test = split_subject_windows(labels[rows], test_fraction)
        devices.append(
            DeviceData(
                f"subject{subject:02d}",
                x[rows[train]],
                labels[rows[train]],
                x[rows[test]],
                labels[rows[test]],
                num_classes=len(ACTIVITIES),
                meta=meta,
            )
        )
    return FederatedDataset(
        name="uci_har",
        partition="natural",
        num_classes=len(ACTIVITIES),
        input_shape=x.shape[1:],
        input_dtype=np.float32,
        devices=devices,
        meta=meta,
    )
