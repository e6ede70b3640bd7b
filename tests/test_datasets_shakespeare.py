"""Raw Shakespeare text: speech parsing, LEAF-style sequences, split by speech (generated and real text)."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
from fixtures.dataset_files import write_play

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.shakespeare import (
    LEAF_LETTERS,
    SEQ_LEN,
    UNKNOWN_INDEX,
    decode,
    encode,
    load_shakespeare,
    next_char_samples,
    parse_speeches,
)


def random_line(rng: np.random.Generator, words: int) -> str:
    # Random words make every 81-character window unique, so overlap checks cannot pass by accident.
    letters = list(string.ascii_letters + ",.;'")
    return " ".join("".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(words))


@pytest.fixture
def play(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    rng = np.random.default_rng(0)
    roles = {"First Citizen": 24, "MENENIUS": 30, "Senators, &C": 21, "Messenger": 3}
    order = [role for role, n in roles.items() for _ in range(n)]
    rng.shuffle(order)
    speeches = [(role, [random_line(rng, int(rng.integers(3, 12))) for _ in range(int(rng.integers(1, 4)))])
                for role in order]  # fmt: skip
    path = write_play(tmp_path / "play.txt", speeches)
    by_role: dict[str, list[str]] = {}
    for role, lines in speeches:
        by_role.setdefault(role, []).append(" ".join(lines))
    return path, by_role


def test_encode_uses_leafs_alphabet_and_a_reserved_unknown() -> None:
    assert len(LEAF_LETTERS) == 80 and UNKNOWN_INDEX == 80
    assert encode("\n !a}").tolist() == [0, 1, 2, LEAF_LETTERS.index("a"), 79]
    assert encode("$é€").tolist() == [UNKNOWN_INDEX] * 3
    assert decode(encode("To be, or not")) == "To be, or not"


def test_speeches_are_parsed_with_lines_joined_by_spaces(play: tuple[Path, dict[str, list[str]]]) -> None:
    path, by_role = play
    speeches = parse_speeches(path)
    assert sum(len(v) for v in by_role.values()) == len(speeches)
    for role, texts in by_role.items():
        assert [s.text for s in speeches if s.speaker == role] == texts


def test_empty_speeches_and_unattributed_blocks_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "odd.txt"
    path.write_text("ACT I\nSCENE I. Rome.\n\nTITUS:\n\nCOMINIUS:\nNoble Marcius!\nThus it is:\nwell.\n")
    speeches = parse_speeches(path)
    assert [(s.speaker, s.text) for s in speeches] == [("COMINIUS", "Noble Marcius! Thus it is: well.")]


def test_next_char_samples_are_consecutive_windows() -> None:
    text = "abcdefghij" * 12  # 120 characters -> 40 windows of 80 + 1 at stride 1
    x, y = next_char_samples(text)
    assert x.shape == (40, SEQ_LEN) and y.shape == (40,)
    for i in (0, 17, 39):
        assert decode(x[i]) == text[i : i + SEQ_LEN] and decode(y[i : i + 1]) == text[i + SEQ_LEN]
    x5, _ = next_char_samples(text, stride=5)
    assert len(x5) == 8 and decode(x5[1]) == text[5 : 5 + SEQ_LEN]
    capped, _ = next_char_samples(text, max_samples=4)
    # Four evenly spaced windows out of 40, first and last included: starts 0, 13, 26, 39.
    assert [decode(row)[:3] for row in capped] == [text[i : i + 3] for i in (0, 13, 26, 39)]
    assert next_char_samples("short")[0].shape == (0, SEQ_LEN)


def test_load_keeps_speakers_with_enough_speeches_and_splits_by_speech(
    play: tuple[Path, dict[str, list[str]]],
) -> None:
    path, by_role = play
    data = load_shakespeare(path, min_speeches=20, test_fraction=0.25, seed=3)
    assert [d.device_id for d in data.devices] == ["First_Citizen", "MENENIUS", "Senators_C"]
    assert data.meta["speakers"]["Senators_C"] == "Senators, &C"
    assert data.num_classes == 81 and data.input_shape == (SEQ_LEN,) and data.input_dtype == np.int64
    for dev in data.devices:
        texts = by_role[data.meta["speakers"][dev.device_id]]
        train_text = " ".join(decode(np.r_[x, y]) for x, y in zip(dev.x_train, dev.y_train))
        for x, y in zip(dev.x_test, dev.y_test):
            window = decode(np.r_[x, y])
            # No half of a test sequence occurs in train text: they share no speech.
            assert window[:40] not in train_text and window[41:] not in train_text
            # Every word is this speaker's (a window may span two speeches, so check word by word).
            assert all(any(word in t for t in texts) for word in window.split(" "))
        assert dev.num_train > dev.num_test > 0


def test_caps_and_seed(play: tuple[Path, dict[str, list[str]]]) -> None:
    path, _ = play
    capped = load_shakespeare(path, max_train_per_speaker=30, max_test_per_speaker=7, max_speakers=2)
    assert [d.device_id for d in capped.devices] == [
        "First_Citizen",
        "MENENIUS",
    ]  # the two with most speeches
    assert all(d.num_train == 30 and d.num_test <= 7 for d in capped.devices)
    a, b = load_shakespeare(path, seed=1), load_shakespeare(path, seed=1)
    c = load_shakespeare(path, seed=2)
    assert all(np.array_equal(p.x_test, q.x_test) for p, q in zip(a.devices, b.devices))
    assert not all(np.array_equal(p.x_test, q.x_test) for p, q in zip(a.devices, c.devices))


def test_bad_text_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing\.txt: Shakespeare text file does not exist"):
        parse_speeches(tmp_path / "missing.txt")
    prose = tmp_path / "prose.txt"
    prose.write_text("It was a dark and stormy night.\n\nThe end.\n")
    with pytest.raises(DatasetError, match=r"prose\.txt: no speeches found"):
        parse_speeches(prose)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ROMEO:\nAdieu, ma chère\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.txt: not UTF-8"):
        parse_speeches(latin1)


def test_real_text_has_at_least_fifty_speakers_with_twenty_speeches(shakespeare_file: Path) -> None:
    data = load_shakespeare(
        shakespeare_file, min_speeches=20, max_train_per_speaker=200, max_test_per_speaker=50
    )
    assert data.num_devices >= 50
    speech_counts: dict[str, int] = {}
    for speech in parse_speeches(shakespeare_file):
        speech_counts[speech.speaker] = speech_counts.get(speech.speaker, 0) + 1
    assert all(speech_counts[name] >= 20 for name in data.meta["speakers"].values())
    assert all(d.num_train == 200 and 0 < d.num_test <= 50 for d in data.devices)
    labels = np.concatenate([d.y_train for d in data.devices])
    assert labels.min() >= 0 and labels.max() < data.num_classes
