"""HMP, the wrist-worn accelerometer data set (Bruno et al., "ADL Recognition with Wrist-worn Accelerometer").

Layout: one folder per activity (``Walk/``, ``Climb_stairs/`` ...); one text file per recording named
``Accelerometer-<YYYY-MM-DD-HH-MM-SS>-<activity>-<volunteer>.txt`` holding rows ``x y z`` of integer
codes 0..63 sampled at 32 Hz (code ``c`` is ``-1.5 g + c / 63 * 3 g``).

``*_MODEL`` folders: despite the manual calling them further recordings, every file in them shares its
start time and volunteer with a file in the plain folder and holds a copy or a cut of that recording
(``walk-f1_1.txt`` ... ``_5`` are five cuts of one walk). We therefore key a recording by
(activity, start time, volunteer): by default an excerpt whose recording is already present is skipped
(it would duplicate data), and with ``include_model_excerpts=True`` it is kept under the same
recording id, so the train/test split still never separates it from its source.

Split rule (`split_recordings`): per volunteer and activity, recordings are shuffled and about
``test_fraction`` of them (at least one, never all) go to test. A volunteer/activity with a single
recording goes to train, since a class seen only at test time cannot be learnt. If that leaves a
volunteer with no test recording at all (every activity has one recording), one of its recordings is
moved to test so every device can be evaluated; that volunteer's test labels then differ from its
train labels, which is the price of evaluating it at all. Recordings shorter than one window yield no
window and are dropped before splitting.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.federated import DeviceData, FederatedDataset
from fedmask.datasets.parse_cache import ParseCache, content_key

logger = logging.getLogger(__name__)

# Label index = position here (the manual's order), so labels do not depend on which folders exist.
ACTIVITIES = (
    "brush_teeth",
    "climb_stairs",
    "comb_hair",
    "descend_stairs",
    "drink_glass",
    "eat_meat",
    "eat_soup",
    "getup_bed",
    "liedown_bed",
    "pour_water",
    "sitdown_chair",
    "standup_chair",
    "use_telephone",
    "walk",
)
SAMPLE_RATE_HZ = 32
WINDOW = 128  # 4 s at 32 Hz
MAX_CODE = 63
G_RANGE = 1.5  # codes 0..63 span -1.5 g .. +1.5 g

_FILE_NAME = re.compile(
    r"^Accelerometer-(?P<start>\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2})-(?P<activity>[a-z_]+)"
    r"-(?P<volunteer>[fm]\d+)(?:_(?P<cut>\d+))?\.txt$"
)
_MODEL_SUFFIX = "_MODEL"


@dataclass(frozen=True)
class HMPRecording:
    """One recording: ``samples`` is ``[T, 3]`` uint8 codes 0..63 (read-only)."""

    activity: str
    label: int
    volunteer: str
    recording_id: str  # "<activity>/<start time>-<volunteer>", shared by excerpts of one recording
    samples: np.ndarray
    path: Path


def read_recordings(root: str | PathLike[str], include_model_excerpts: bool = False) -> list[HMPRecording]:
    """Every recording under ``root`` (an ``HMP_Dataset`` folder), sorted by recording id then path.

    Parsing is cached per process, keyed by the files' names and content.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(base, "HMP folder does not exist (expected activity folders such as Walk/)")
    files = sorted(base.glob("*/*.txt"))
    if not files:
        raise DatasetError(base, "no recordings found (expected <Activity>/Accelerometer-*.txt files)")
    raws = [p.read_bytes() for p in files]
    key = content_key((str(p), raw) for p, raw in zip(files, raws))
    recordings = _CACHE.get_or_parse(key, lambda: _parse_all(files, raws))
    if include_model_excerpts:
        return list(recordings)
    in_plain_folders = {r.recording_id for r in recordings if not r.path.parent.name.endswith(_MODEL_SUFFIX)}
    return [
        r
        for r in recordings
        if not (r.path.parent.name.endswith(_MODEL_SUFFIX) and r.recording_id in in_plain_folders)
    ]


_CACHE: ParseCache[tuple[HMPRecording, ...]] = ParseCache(max_items=2)


def _parse_all(files: list[Path], raws: list[bytes]) -> tuple[HMPRecording, ...]:
    names = [_name_fields(path) for path in files]
    recordings = [
        HMPRecording(
            activity=activity,
            label=ACTIVITIES.index(activity),
            volunteer=volunteer,
            recording_id=f"{activity}/{start}-{volunteer}",
            samples=samples,
            path=path,
        )
        for path, (activity, volunteer, start), samples in zip(files, names, _parse_many(files, raws))
    ]
    return tuple(sorted(recordings, key=lambda r: (r.recording_id, str(r.path))))


def _name_fields(path: Path) -> tuple[str, str, str]:
    """(activity, volunteer, start time) from a recording's folder and file name, checked."""
    folder_activity = path.parent.name.removesuffix(_MODEL_SUFFIX).lower()
    if folder_activity not in ACTIVITIES:
        raise DatasetError(path.parent, f"unknown activity folder; expected one of {', '.join(ACTIVITIES)}")
    match = _FILE_NAME.match(path.name)
    if not match:
        raise DatasetError(
            path, "file name is not Accelerometer-<YYYY-MM-DD-HH-MM-SS>-<activity>-<f|m><N>.txt"
        )
    if match["activity"] != folder_activity:
        raise DatasetError(
            path, f"file name says activity {match['activity']!r} but it is in folder {folder_activity!r}"
        )
    return folder_activity, match["volunteer"], match["start"]


def _parse_many(files: list[Path], raws: list[bytes]) -> list[np.ndarray]:
    """Every file's samples from one NumPy parse of all of them (read-only views of one array).

    Parsing ~1000 small files one by one costs more in per-call overhead than in parsing; if the
    joint parse finds anything wrong, a file-by-file pass names the culprit.
    """
    texts = [raw.strip() for raw in raws]
    rows = [_count_rows(text) for text in texts]
    values = _parse_ints(b"\n".join(texts))
    valid = (
        values is not None
        and 0 not in rows
        and values.size == 3 * sum(rows)
        and (values.size == 0 or (values.min() >= 0 and values.max() <= MAX_CODE))
    )
    if not valid:
        for path, raw in zip(files, raws):
            parse_samples(raw, source=path)  # raises, naming the file
        raise DatasetError(files[0].parent.parent, "recordings parse one by one but not together")
    codes = values.astype(np.uint8).reshape(-1, 3)
    codes.setflags(write=False)
    return np.split(codes, np.cumsum(rows)[:-1])


def parse_samples(raw: bytes, source: str | PathLike[str] = "<bytes>") -> np.ndarray:
    """Rows of ``x y z`` integer codes as a ``[T, 3]`` uint8 array, checking shape and range."""
    text = raw.strip()
    if not text:
        raise DatasetError(source, "empty recording; expected rows of 'x y z' integers 0..63")
    values = _parse_ints(text)
    if values is None:
        raise DatasetError(source, "expected rows of 'x y z' integers 0..63; found other text")
    num_rows = _count_rows(text)
    if values.size != 3 * num_rows:
        raise DatasetError(
            source, f"expected 3 values per row ('x y z'), found {values.size} values in {num_rows} rows"
        )
    if values.min() < 0 or values.max() > MAX_CODE:
        raise DatasetError(source, f"values outside the accelerometer's code range 0..{MAX_CODE}")
    return values.astype(np.uint8).reshape(num_rows, 3)


def _parse_ints(text: bytes) -> np.ndarray | None:
    """Whitespace-separated integers, or None if anything else is in the text."""
    with warnings.catch_warnings():
        # NumPy reports text it cannot parse as a DeprecationWarning and returns what it read so far.
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return np.fromstring(text, dtype=np.int16, sep=" ")
        except (DeprecationWarning, ValueError):
            return None


def _count_rows(text: bytes) -> int:
    """Non-blank lines of a stripped text."""
    if not text:
        return 0
    if b"\n\n" in text or b"\n\r\n" in text:  # blank lines inside: count the slow way
        return sum(1 for line in text.splitlines() if line.strip())
    return text.count(b"\n") + 1


def codes_to_g(codes: np.ndarray) -> np.ndarray:
    """Accelerometer codes 0..63 as float32 acceleration in g (-1.5 .. +1.5)."""
    return codes.astype(np.float32) * np.float32(2 * G_RANGE / MAX_CODE) - np.float32(G_RANGE)


def window_samples(samples: np.ndarray, window: int = WINDOW, stride: int = WINDOW // 2) -> np.ndarray:
    """Windows ``[W, 3, window]`` in g from ``[T, 3]`` codes; windows start at 0, stride, 2*stride ...

    A tail shorter than a window is dropped; a recording shorter than one window yields none.
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, found {window} and {stride}")
    if len(samples) < window:
        return np.empty((0, samples.shape[1], window), dtype=np.float32)
    views = np.lib.stride_tricks.sliding_window_view(samples, window, axis=0)[::stride]
    return codes_to_g(views)


def split_recordings(
    recordings: list[HMPRecording], test_fraction: float = 0.25, seed: int = 0
) -> dict[str, tuple[list[HMPRecording], list[HMPRecording]]]:
    """Per volunteer, (train recordings, test recordings) by the rule in this module's docstring."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), found {test_fraction}")
    rng = np.random.default_rng(seed)
    by_volunteer: dict[str, dict[int, dict[str, list[HMPRecording]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for rec in recordings:  # excerpts share a recording id, so they travel together
        by_volunteer[rec.volunteer][rec.label][rec.recording_id].append(rec)

    result = {}
    for volunteer in sorted(by_volunteer, key=volunteer_sort_key):
        train: list[list[HMPRecording]] = []
        test: list[list[HMPRecording]] = []
        for label in sorted(by_volunteer[volunteer]):
            groups = [by_volunteer[volunteer][label][rid] for rid in sorted(by_volunteer[volunteer][label])]
            order = rng.permutation(len(groups))
            n_test = (
                0 if len(groups) == 1 else min(len(groups) - 1, max(1, round(test_fraction * len(groups))))
            )
            test.extend(groups[i] for i in order[:n_test])
            train.extend(groups[i] for i in order[n_test:])
        if not test and len(train) > 1:
            test.append(train.pop(int(rng.integers(len(train)))))
            logger.info("HMP volunteer %s has one recording per activity; moved one to test", volunteer)
        result[volunteer] = ([r for g in train for r in g], [r for g in test for r in g])
    return result


def volunteer_sort_key(volunteer: str) -> tuple[str, int]:
    """Order f1, f2, ..., f10, m1, ... (numerically, not as text)."""
    return volunteer[0], int(volunteer[1:])


def load_hmp(
    root: str | PathLike[str],
    *,
    stride: int = WINDOW // 2,
    test_fraction: float = 0.25,
    seed: int = 0,
    include_model_excerpts: bool = False,
) -> FederatedDataset:
    """HMP as a federation: one device per volunteer, windows ``[N, 3, 128]`` float32 in g."""
    recordings = read_recordings(root, include_model_excerpts)
    usable = [r for r in recordings if len(r.samples) >= WINDOW]
    if len(usable) < len(recordings):
        logger.info(
            "HMP: %d recordings shorter than %d samples dropped", len(recordings) - len(usable), WINDOW
        )
    devices = []
    for volunteer, (train, test) in split_recordings(usable, test_fraction, seed).items():
        x_train, y_train = _windows_of(train, stride)
        x_test, y_test = _windows_of(test, stride)
        devices.append(DeviceData(volunteer, x_train, y_train, x_test, y_test, num_classes=len(ACTIVITIES)))
    meta = {
        "activities": list(ACTIVITIES),
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "window": WINDOW,
        "stride": stride,
    }
    for dev in devices:
        dev.meta = meta
    return FederatedDataset(
        name="hmp",
        partition="natural",
        num_classes=len(ACTIVITIES),
        input_shape=(3, WINDOW),
        input_dtype=np.float32,
        devices=devices,
        meta=meta,
    )


def _windows_of(recordings: list[HMPRecording], stride: int) -> tuple[np.ndarray, np.ndarray]:
    """All windows of ``recordings`` with their labels, gathered in one indexing operation."""
    lengths = np.array([len(r.samples) for r in recordings], dtype=np.int64)
    counts = np.maximum(0, (lengths - WINDOW) // stride + 1)
    if counts.sum() == 0:
        return np.empty((0, 3, WINDOW), dtype=np.float32), np.empty(0, dtype=np.int64)
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    starts = np.concatenate([o + stride * np.arange(c) for o, c in zip(offsets, counts)])
    codes = np.concatenate([r.samples for r in recordings])
    views = np.lib.stride_tricks.sliding_window_view(codes, WINDOW, axis=0)  # [T - 127, 3, WINDOW]
    labels = np.repeat(np.array([r.label for r in recordings], dtype=np.int64), counts)
    return codes_to_g(views[starts]), labels
