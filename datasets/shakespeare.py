"""Raw Shakespeare text as a federation of speaking roles, LEAF-style next-character prediction.

Input: plain text where each speech is a block (separated by blank lines) whose first line is
``SPEAKER NAME:`` (the format of ``tinyshakespeare.txt``). One device per speaker with at least
``min_speeches`` non-empty speeches.

Samples follow LEAF (Caldas et al., 2018): ``x`` is 80 consecutive characters, ``y`` the character
after them, over LEAF's fixed 80-character alphabet; any other character maps to the reserved index
80, so there are 81 classes. A speech's lines are joined with single spaces, as LEAF does.

Split rule: per speaker, whole speeches are drawn at random for test (``test_fraction``, at least one)
and the rest are train. Train and test texts are each the speaker's speeches in file order joined by a
space, and sequences are cut from each text separately, so no test sequence shares a character with a
train sequence. ``stride`` spaces consecutive sequences (LEAF uses 1); ``max_*_per_speaker`` keeps
that many evenly spaced sequences, which keeps CPU runs small.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from fedmask.datasets.errors import DatasetError
from fedmask.datasets.federated import DeviceData, FederatedDataset, unique_device_ids

logger = logging.getLogger(__name__)

# LEAF's ALL_LETTERS (models/utils/language_utils.py); index = position.
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
UNKNOWN_INDEX = len(LEAF_LETTERS)
VOCAB_SIZE = len(LEAF_LETTERS) + 1
SEQ_LEN = 80

_CODE_TABLE = np.full(128, UNKNOWN_INDEX, dtype=np.int64)
_CODE_TABLE[[ord(c) for c in LEAF_LETTERS]] = np.arange(len(LEAF_LETTERS))
# A speaker line: a name without colons, ending in one colon ("First Citizen:", "Senators, &C:").
_SPEAKER_LINE = re.compile(r"[^\s:][^:]{0,60}:")


def encode(text: str) -> np.ndarray:
    """Characters as int64 indices into `LEAF_LETTERS`; anything else becomes `UNKNOWN_INDEX`."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    out = np.full(len(codes), UNKNOWN_INDEX, dtype=np.int64)
    ascii_mask = codes < 128
    out[ascii_mask] = _CODE_TABLE[codes[ascii_mask]]
    return out


def decode(indices: np.ndarray) -> str:
    """Inverse of `encode`; the unknown index shows as U+FFFD."""
    letters = [*LEAF_LETTERS, "\ufffd"]
    return "".join(letters[i] for i in np.asarray(indices).ravel())


def vocabulary_meta() -> dict[str, object]:
    """What a device needs to encode and decode text for the character models."""
    return {"vocab": LEAF_LETTERS, "unknown_index": UNKNOWN_INDEX, "seq_len": SEQ_LEN}


@dataclass(frozen=True)
class Speech:
    speaker: str
    text: str  # the speech's lines joined by single spaces


def parse_speeches(path: str | PathLike[str]) -> list[Speech]:
    """Every non-empty speech in the file, in order. Blocks without a speaker line are skipped."""
    src = Path(path)
    if not src.is_file():
        raise DatasetError(src, "Shakespeare text file does not exist")
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(src, f"not UTF-8 text ({exc})") from exc
    speeches = []
    unattributed = 0
    for block in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n")):
        lines = [line.strip() for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        if not _SPEAKER_LINE.fullmatch(lines[0]):
            unattributed += 1
            continue
        body = " ".join(" ".join(lines[1:]).split())
        if body:  # a speaker line with no speech under it is a stage artefact, not a speech
            speeches.append(Speech(lines[0][:-1].strip(), body))
    if not speeches:
        raise DatasetError(src, "no speeches found; expected blocks whose first line is 'SPEAKER NAME:'")
    if unattributed:
        logger.warning("%s: skipped %d text blocks without a 'SPEAKER NAME:' line", src, unattributed)
    return speeches


def next_char_samples(
    text: str, stride: int = 1, max_samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """LEAF samples from one text: ``x`` int64 ``[N, 80]``, ``y`` int64 ``[N]``."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, found {stride}")
    codes = encode(text)
    if len(codes) <= SEQ_LEN:
        return np.empty((0, SEQ_LEN), dtype=np.int64), np.empty(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(codes, SEQ_LEN + 1)[::stride]
    if max_samples is not None and len(windows) > max_samples:
        windows = windows[np.unique(np.linspace(0, len(windows) - 1, max_samples).round().astype(np.int64))]
    windows = np.ascontiguousarray(windows)
    return windows[:, :SEQ_LEN].copy(), windows[:, SEQ_LEN].copy()


def load_shakespeare(
    path: str | PathLike[str],
    *,
    min_speeches: int = 20,
    max_speakers: int | None = None,
    test_fraction: float = 0.2,
    stride: int = 1,
    max_train_per_speaker: int | None = None,
    max_test_per_speaker: int | None = None,
    seed: int = 0,
) -> FederatedDataset:
    """The text as a federation, one device per speaker; see the module docstring for the rules.

    ``max_speakers`` keeps the speakers with the most speeches (ties by name).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), found {test_fraction}")
    by_speaker: dict[str, list[str]] = defaultdict(list)
    for speech in parse_speeches(path):
        by_speaker[speech.speaker].append(speech.text)
    speakers = sorted((s for s in by_speaker if len(by_speaker[s]) >= max(min_speeches, 2)), key=str)
    if max_speakers is not None:
        speakers = sorted(speakers, key=lambda s: (-len(by_speaker[s]), s))[:max_speakers]
        speakers.sort()
    if not speakers:
        raise DatasetError(path, f"no speaker has {min_speeches} or more speeches")
    rng = np.random.default_rng(seed)
    devices = []
    meta = vocabulary_meta()
    for device_id, speaker in zip(unique_device_ids(speakers), speakers):
        texts = by_speaker[speaker]
        n_test = min(len(texts) - 1, max(1, round(test_fraction * len(texts))))
        is_test = np.zeros(len(texts), dtype=bool)
        is_test[rng.choice(len(texts), size=n_test, replace=False)] = True
        x_train, y_train = next_char_samples(
            " ".join(t for t, test in zip(texts, is_test) if not test), stride, max_train_per_speaker
        )
        x_test, y_test = next_char_samples(
            " ".join(t for t, test in zip(texts, is_test) if test), stride, max_test_per_speaker
        )
        devices.append(
            DeviceData(device_id, x_train, y_train, x_test, y_test, num_classes=VOCAB_SIZE, meta=meta)
        )
    return FederatedDataset(
        name="shakespeare",
        partition="natural",
        num_classes=VOCAB_SIZE,
        input_shape=(SEQ_LEN,),
        input_dtype=np.int64,
        devices=devices,
        meta={**meta, "speakers": {d.device_id: s for d, s in zip(devices, speakers)}},
    )
