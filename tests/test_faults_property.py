"""Fault injection as a property, over real processes: the broker (Mosquitto), the aggregator and the
device agents each run as their own OS process; seeded random kill points (see `benchmarks/faults.py`,
which runs the >= 50-kill campaign) and the invariants afterwards:

- every receipt an agent got has exactly one stored row (nothing acknowledged is lost);
- no (task, device, base round) is stored twice;
- every participant ends with a personalized model;
- every round closes;
- no process waits without a deadline: all of them exit before the trial's deadline.

Bounded for CI: two seeds, two kills each, two agents, two rounds (about a minute on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedmask.broker_config.binaries import find_mosquitto

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# benchmarks/ is a folder of scripts, not a package.
import faults as campaign

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

# Seed 3: an agent killed between two frames of its result, the aggregator between its 2nd commit and
# ack. Seed 8: an agent killed before publishing its result, the broker killed before autosave.
SEEDS = (3, 8)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_kill_points_lose_nothing_count_nothing_twice_and_never_hang(
    seed: int, tmp_path: Path, hmp_root: Path
) -> None:
    result = campaign.run_trial(seed, tmp_path / f"seed-{seed}", agents=2, kills=2, rounds=2, timeout_s=150)
    assert result.fired, f"no kill point fired: {result}"
    assert result.hangs == [], result
    assert result.lost == 0 and result.double == 0, result
    assert result.missing_models == [], result
    assert result.open_rounds == [], result
    assert result.exit_codes["aggregator"] == 0, result
    assert result.receipts > 0, result
