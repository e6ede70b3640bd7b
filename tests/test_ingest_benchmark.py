"""One small real run of benchmarks/ingest.py (its own Mosquitto, a SQLite file): the script that
measures issue 11's ingest targets keeps working. It checks what the run did, not how fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ingest.py"


def test_quick_ingest_run_stores_every_update_and_batches_them(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--engines", "sqlite", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {row["what"]: row for row in result["ingest"]}
    assert len(rows) == 3  # baseline, writer thread, writer process
    baseline = rows["one commit per update (baseline)"]
    assert baseline["median_batch"] == 1 and baseline["x_baseline"] == 1.0
    for what, row in rows.items():
        # run_fleet raises unless every update got its receipt and is stored: a row means all 300 did
        assert row["updates"] == 300 and row["updates_per_s"] > 0 and row["cpu_ms_per_update"] > 0, what
    grouped = [row for what, row in rows.items() if what.startswith("group commit")]
    assert all(row["median_batch"] > 1 for row in grouped)
    rounds = {row["devices"]: row for row in result["rounds"]}
    assert sorted(rounds) == [10, 100]
    assert all(row["aggregate_ms"] > 0 and row["announce_ms"] > 0 for row in rounds.values())
    assert "UPDATES/S" in run.stdout  # the table
