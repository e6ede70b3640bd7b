"""HMP loader: parsing, *_MODEL excerpts, windowing, and the split by recording (generated and real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures.dataset_files import write_hmp_recording

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.hmp import (
    ACTIVITIES,
    HMPRecording,
    load_hmp,
    parse_samples,
    read_recordings,
    split_recordings,
    window_samples,
)


def codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 64, size=(n, 3), dtype=np.uint8)


@pytest.fixture
def hmp_tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A small HMP_Dataset: f1 has several recordings per activity, m2 one per activity, m3 one in all."""
    rng = np.random.default_rng(0)
    root = tmp_path / "HMP_Dataset"
    written = {}
    layout = [
        ("Walk", "walk", "f1", ["2011-03-24-09-51-07", "2011-03-24-09-52-11", "2011-03-24-10-58-34"]),
        ("Climb_stairs", "climb_stairs", "f1", ["2011-04-05-18-21-22", "2011-04-05-18-32-29"]),
        ("Brush_teeth", "brush_teeth", "f1", ["2011-05-30-08-35-11"]),
        ("Walk", "walk", "m2", ["2011-05-30-21-44-35"]),
        ("Getup_bed", "getup_bed", "m2", ["2011-05-30-21-50-00"]),
        ("Pour_water", "pour_water", "m3", ["2012-06-11-11-23-05"]),
    ]
    for k, (folder, activity, volunteer, starts) in enumerate(layout):
        for j, start in enumerate(starts):
            samples = codes(rng, 200 + 64 * (k + j))
            path = write_hmp_recording(root, folder, start, activity, volunteer, samples, crlf=(k % 2 == 0))
            written[f"{activity}/{start}-{volunteer}"] = samples
            if (activity, volunteer, j) == ("walk", "f1", 0):  # a *_MODEL cut of this recording
                cut = path.parent.parent / "Walk_MODEL" / path.name.replace(".txt", "_1.txt")
                cut.parent.mkdir(exist_ok=True)
                cut.write_bytes(b"\r\n".join(b" ".join(b"%d" % v for v in row) for row in samples[20:170]))
    orphan = codes(rng, 160)  # a *_MODEL recording with no source in Walk/: kept
    write_hmp_recording(root, "Walk_MODEL", "2012-05-30-18-28-32", "walk", "f3", orphan)
    written["walk/2012-05-30-18-28-32-f3"] = orphan
    return root, written


def test_recordings_are_parsed_exactly(hmp_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, written = hmp_tree
    recordings = read_recordings(root)
    assert sorted(r.recording_id for r in recordings) == sorted(written)
    for rec in recordings:
        assert np.array_equal(rec.samples, written[rec.recording_id])
        assert rec.label == ACTIVITIES.index(rec.activity)
        assert rec.volunteer == rec.recording_id.rsplit("-", 1)[1]
        assert not rec.samples.flags.writeable  # shared through the per-process cache


def test_model_excerpts_are_skipped_unless_asked_for_and_share_the_recording_id(
    hmp_tree: tuple[Path, dict[str, np.ndarray]],
) -> None:
    root, _ = hmp_tree
    default = read_recordings(root)
    everything = read_recordings(root, include_model_excerpts=True)
    assert len(everything) == len(default) + 1
    cut = next(r for r in everything if r.path.name.endswith("_1.txt"))
    source = next(r for r in default if r.recording_id == cut.recording_id)
    assert source.path.parent.name == "Walk" and np.array_equal(cut.samples, source.samples[20:170])


def test_windows_follow_the_stride_and_map_codes_to_g() -> None:
    samples = np.tile(np.array([[0, 21, 63]], dtype=np.uint8), (300, 1))
    samples[:, 0] = np.arange(300) % 64
    windows = window_samples(samples, window=128, stride=64)
    assert windows.shape == (3, 3, 128)  # starts 0, 64, 128; a 300-sample recording has no room at 192
    assert windows.dtype == np.float32
    # Manual: real_val = -1.5 g + code / 63 * 3 g.
    np.testing.assert_allclose(windows[:, 1], -0.5, atol=1e-6)
    np.testing.assert_allclose(windows[:, 2], 1.5, atol=1e-6)
    np.testing.assert_allclose(windows[1, 0], -1.5 + (np.arange(64, 192) % 64) / 63 * 3, atol=1e-6)
    assert window_samples(samples[:127]).shape == (0, 3, 128)


def test_split_is_by_recording_with_the_documented_rule(hmp_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = hmp_tree
    splits = split_recordings(read_recordings(root), test_fraction=0.25, seed=0)
    for train, test in splits.values():
        assert not {r.recording_id for r in train} & {r.recording_id for r in test}
    f1_train, f1_test = splits["f1"]
    test_per_activity = {
        a: sum(r.activity == a for r in f1_test) for a in ("walk", "climb_stairs", "brush_teeth")
    }
    # 3 walks: round(0.75) = 1 to test; 2 climbs: one each way; a lone brush_teeth stays in train.
    assert test_per_activity == {"walk": 1, "climb_stairs": 1, "brush_teeth": 0}
    assert len(f1_train) == 4
    m2_train, m2_test = splits["m2"]  # one recording per activity: one is moved to test
    assert len(m2_train) == 1 and len(m2_test) == 1
    m3_train, m3_test = splits["m3"]  # a volunteer's only recording trains; there is nothing to test on
    assert [r.recording_id for r in m3_train] == ["pour_water/2012-06-11-11-23-05-m3"] and m3_test == []


def test_split_is_seeded(hmp_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = hmp_tree
    recordings = read_recordings(root)

    def test_ids(seed: int) -> list[str]:
        return sorted(
            r.recording_id for _, test in split_recordings(recordings, seed=seed).values() for r in test
        )

    assert test_ids(0) == test_ids(0)
    assert len({tuple(test_ids(s)) for s in range(8)}) > 1


def window_set(recordings: list[HMPRecording], stride: int) -> set[bytes]:
    return {w.tobytes() for r in recordings for w in window_samples(r.samples, 128, stride)}


def assert_windows_come_from(dev_x: np.ndarray, recordings: list[HMPRecording], stride: int) -> None:
    allowed = window_set(recordings, stride)
    assert all(w.tobytes() in allowed for w in dev_x)
    assert len(dev_x) == sum(len(window_samples(r.samples, 128, stride)) for r in recordings)


def test_load_hmp_builds_one_device_per_volunteer_from_disjoint_recordings(
    hmp_tree: tuple[Path, dict[str, np.ndarray]],
) -> None:
    root, _ = hmp_tree
    data = load_hmp(root, stride=32, seed=0)
    assert [d.device_id for d in data.devices] == ["f1", "f3", "m2", "m3"]
    assert data.num_classes == len(ACTIVITIES) and data.input_shape == (3, 128)
    splits = split_recordings(read_recordings(root), seed=0)
    for dev in data.devices:
        train, test = splits[dev.device_id]
        assert_windows_come_from(dev.x_train, train, stride=32)
        assert_windows_come_from(dev.x_test, test, stride=32)
        assert np.array_equal(np.unique(dev.y_train), sorted({r.label for r in train}))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"1 2 3\r\n4 5\r\n", "3 values per row"),
        (b"1 2 3\n4 5 64\n", "code range 0..63"),
        (b"1 2 3\n4 x 6\n", "found other text"),
        (b"1 2 3\n-1 5 6\n", "code range"),
        (b"\n\n", "empty recording"),
    ],
)
def test_malformed_recordings_name_the_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "HMP_Dataset" / "Walk" / "Accelerometer-2011-03-24-09-51-07-walk-f1.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=problem) as err:
        read_recordings(tmp_path / "HMP_Dataset")
    assert err.value.path == str(path)


def test_blank_lines_inside_a_recording_are_tolerated() -> None:
    assert parse_samples(b"1 2 3\r\n\r\n4 5 6\r\n").tolist() == [[1, 2, 3], [4, 5, 6]]


def test_bad_names_and_folders_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "HMP_Dataset"
    write_hmp_recording(root, "Walk", "2011-03-24", "walk", "f1", np.zeros((3, 3), np.uint8))
    with pytest.raises(DatasetError, match="file name is not Accelerometer-"):
        read_recordings(root)
    (root / "Walk").rename(root / "Juggle")
    with pytest.raises(DatasetError, match="Juggle: unknown activity folder"):
        read_recordings(root)
    with pytest.raises(DatasetError, match="HMP folder does not exist"):
        read_recordings(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no recordings found"):
        read_recordings(tmp_path)


def test_real_hmp_split_never_shares_a_recording(hmp_root: Path) -> None:
    recordings = [r for r in read_recordings(hmp_root) if len(r.samples) >= 128]
    volunteers = {r.volunteer for r in recordings}
    assert len(volunteers) == 16
    splits = split_recordings(recordings, seed=0)
    for volunteer, (train, test) in splits.items():
        train_ids, test_ids = {r.recording_id for r in train}, {r.recording_id for r in test}
        assert not train_ids & test_ids
        assert len(train_ids) + len(test_ids) == sum(r.volunteer == volunteer for r in recordings)
        assert test_ids, f"volunteer {volunteer} has no test recording"


def test_real_hmp_devices_hold_windows_of_their_own_split(hmp_root: Path) -> None:
    data = load_hmp(hmp_root, seed=0)
    assert data.num_devices == 16
    splits = split_recordings([r for r in read_recordings(hmp_root) if len(r.samples) >= 128], seed=0)
    for dev in data.devices:
        train, test = splits[dev.device_id]
        assert dev.num_train > 0 and dev.num_test > 0
        assert_windows_come_from(dev.x_test, test, stride=64)
        assert dev.num_train == sum(len(window_samples(r.samples)) for r in train)
        assert dev.x_train.min() >= -1.5 and dev.x_train.max() <= 1.5
