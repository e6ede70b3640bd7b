"""`fedmask db|devices|rounds|round|models` against real databases, through the real entry point."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from fedmask.cli import main
from fedmask.storage import Store
from fedmask.storage.migrate import head_revision

UTC = dt.timezone.utc
FLEET, TASK = "orchard", "orchard-t1"


@pytest.fixture
def populated(store: Store) -> dict[str, bytes]:
    """One closed round with two updates and a rejection, and one personalized model; returns its files."""
    store.register_task(FLEET, TASK, spec={}, seed=9, weights_digest="d" * 64, strategy="fedmask", arch="mlp")
    store.upsert_device(FLEET, "pi-1", presence="online", capabilities={"cpu": "cortex-a72"})
    store.open_round(TASK, 1, quorum=2, deadline=dt.datetime.now(UTC) + dt.timedelta(minutes=5))
    for device in ("pi-1", "pi-2"):
        fields = {"base_round": 0, "staleness": 0, "weight": 1.0, "num_samples": 5, "metrics": {}}
        store.record_update(TASK, 1, device, payload=os.urandom(3000), **fields)
    where = {"task_id": TASK, "round_no": 1, "device_id": "pi-3"}
    store.record_rejection(FLEET, reason="bad_checksum", detail="crc32 mismatch", **where)
    store.close_round(TASK, 1, aggregate=b"global", closed_by="quorum")
    files = {"mask": os.urandom(100), "weights": os.urandom(300), "tflite": b"TFL3" + os.urandom(500)}
    scores = {
        "accuracy": 0.875,
        "latency_ms": 0.4,
        "size_bytes": 504,
        "peak_rss_bytes": 9 << 20,
        "metrics": {},
    }
    store.save_personalized_model(TASK, "pi-1", **files, **scores)
    return files


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `fedmask ARGV...`, require success, return what it printed."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, f"fedmask {' '.join(argv)} exited {code}: {captured.err}"
    return captured.out


def test_db_upgrade_creates_the_schema(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "db", "upgrade", "--db", sqlite_url)
    assert f"schema at revision {head_revision()} (newest)" in out
    with Store(sqlite_url) as store:
        store.check_schema()
    assert run(capsys, "devices", "--json", "--db", sqlite_url) == "[]\n"


def test_queries_print_tables_and_json(
    store_url: str, populated: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    header, _rule, *rows = run(capsys, "devices", "--fleet", FLEET, "--db", store_url).splitlines()
    assert header.split()[:3] == ["FLEET", "DEVICE", "PRESENCE"]
    assert [row.split()[1:3] for row in rows] == [["pi-1", "online"], ["pi-2", "-"]]

    out = run(capsys, "devices", "--fleet", FLEET, "--json", "--db", store_url)
    devices = json.loads(out)
    assert [d["device_id"] for d in devices] == ["pi-1", "pi-2"]
    assert devices[0]["capabilities"] == {"cpu": "cortex-a72"}
    assert dt.datetime.fromisoformat(devices[0]["last_seen_at"]).tzinfo is not None

    out = run(capsys, "rounds", "--task", TASK, "--json", "--db", store_url)
    (round_1,) = json.loads(out)
    assert (round_1["participants"], round_1["rejections"], round_1["closed_by"]) == (2, 1, "quorum")
    assert round_1["payload_bytes"] == 6000

    out = run(capsys, "round", "1", "--task", TASK, "--db", store_url)
    assert "closed by quorum" in out and "pi-1" in out and "pi-2" in out
    assert "bad_checksum" in out and "crc32 mismatch" in out

    out = run(capsys, "models", "list", "--min-accuracy", "0.8", "--json", "--db", store_url)
    assert [(m["device_id"], m["accuracy"]) for m in json.loads(out)] == [("pi-1", 0.875)]
    out = run(capsys, "models", "list", "--min-accuracy", "0.9", "--json", "--db", store_url)
    assert json.loads(out) == []


def test_models_export_writes_the_stored_bytes(
    store_url: str, populated: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for fmt, stored_as in (("tflite", "tflite"), ("torch", "weights"), ("mask", "mask")):
        target = tmp_path / f"pi-1.{fmt}"
        run(capsys, "models", "export", "pi-1", "--format", fmt, "-o", str(target), "--db", store_url)
        assert target.read_bytes() == populated[stored_as]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_db_prune_frees_old_payloads(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with Store(sqlite_url) as store:
        store.upgrade()
        store.register_task(FLEET, TASK, spec={}, seed=1, weights_digest="d", strategy="fedmask", arch="mlp")
        for round_no in (1, 2):
            store.open_round(TASK, round_no, quorum=1, deadline=dt.datetime.now(UTC))
            fields = {"base_round": 0, "staleness": 0, "weight": 1.0, "num_samples": 1, "metrics": {}}
            store.record_update(TASK, round_no, "pi-1", payload=b"round %d" % round_no, **fields)
            store.close_round(TASK, round_no, aggregate=b"g%d" % round_no, closed_by="quorum")
    assert run(capsys, "db", "prune", "--keep", "1", "--db", sqlite_url) == "freed 1 blobs\n"
    out = run(capsys, "round", "1", "--task", TASK, "--json", "--db", sqlite_url)
    assert [u["payload_pruned"] for u in json.loads(out)["updates"]] == [True]


def test_database_url_comes_from_the_environment(
    store_url: str, populated: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDMASK_DB", store_url)
    assert [m["device_id"] for m in json.loads(run(capsys, "models", "list", "--json"))] == ["pi-1"]


def test_errors_are_clear_and_exit_nonzero(
    store_url: str,
    populated: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def error_line() -> str:
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["devices", "--db", missing]) == 1
    assert "absent.db does not exist; create it with `fedmask db upgrade" in error_line()
    assert not (tmp_path / "absent.db").exists()  # a query never creates an empty database

    assert (
        main(["models", "export", "pi-9", "--format", "mask", "-o", str(tmp_path / "x"), "--db", store_url])
        == 1
    )
    assert "no personalized model stored for device 'pi-9'" in error_line()
    assert main(["devices", "--fleet", "meadow", "--db", store_url]) == 1
    line = error_line()
    assert line.startswith("fedmask: error: ") and "unknown fleet 'meadow'" in line

    with pytest.raises(SystemExit) as usage:
        main(["round", "1", "--db", store_url])
    assert usage.value.code == 2
    assert "--task is required" in capsys.readouterr().err
