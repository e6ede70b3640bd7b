"""``fedmask.heap``: process-wide, so each check runs in an interpreter of its own."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc, json
import fedmask.storage.store  # something sizeable to freeze
before = gc.get_threshold()
from fedmask.heap import YOUNG_THRESHOLD, settle_for_service
settle_for_service()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                  "young": YOUNG_THRESHOLD}))
"""


def test_settling_freezes_what_is_alive_and_collects_young_objects_less_often() -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    got = json.loads(out.stdout)
    assert got["frozen"] > 10_000  # the imports: skipped by every collection from now on
    assert got["after"] == [got["young"], got["before"][1], got["before"][2]]
    assert got["young"] > got["before"][0]
