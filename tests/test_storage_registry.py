"""The model registry and task status on real SQLite and PostgreSQL: versions per (task, device), the
`fedmask models list|history|best|worst|export` and `fedmask tasks` commands, migration 0004 on a
database that already holds models."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from fedmask.cli import main
from fedmask.storage import StorageError, Store
from fedmask.storage.migrate import downgrade, upgrade

UTC = dt.timezone.utc
FLEET = "orchard"
SCHEDULE = {"rounds": 3, "quorum": 2}


def save(store: Store, task: str, device: str, accuracy: float, *, seed: bytes = b"", **extra) -> dict:
    files = {
        "mask": b"mask" + device.encode() + seed,
        "weights": b"weights" + device.encode() + seed,
        "tflite": b"TFL3" + device.encode() + seed + os.urandom(8),
    }
    scores = {
        "accuracy": accuracy,
        "latency_ms": 10 * accuracy,
        "size_bytes": 1000,
        "peak_rss_bytes": 1 << 20,
        "num_test": 40,
        "density": accuracy / 2,
        "metrics": {"accuracy": accuracy},
        **extra,
    }
    version = store.save_personalized_model(task, device, **files, **scores)
    return {**files, "version": version}


def register(store: Store, task: str) -> None:
    store.register_task(
        FLEET,
        task,
        spec={},
        seed=1,
        weights_digest="d" * 64,
        strategy="fedmask",
        arch="mlp",
        schedule=SCHEDULE,
    )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, f"fedmask {' '.join(argv)} exited {code}: {captured.err}"
    return captured.out


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_versions_per_task_and_device(store: Store) -> None:
    register(store, "t1")
    register(store, "t2")
    first = save(store, "t1", "pi-1", 0.5)
    assert first["version"] == 1
    # The same files again (a redelivered result) are the same version, not a new one.
    again = store.save_personalized_model(
        "t1",
        "pi-1",
        mask=first["mask"],
        weights=first["weights"],
        tflite=first["tflite"],
        accuracy=0.5,
        latency_ms=5.0,
        size_bytes=1000,
        peak_rss_bytes=1,
        metrics={},
    )
    assert again == 1
    second = save(store, "t1", "pi-1", 0.7, seed=b"2")
    assert second["version"] == 2
    assert save(store, "t2", "pi-1", 0.9)["version"] == 1  # versions count per task

    newest = store.list_models(task_id="t1")
    assert [(m.device_id, m.version, m.accuracy, m.num_test) for m in newest] == [("pi-1", 2, 0.7, 40)]
    every = store.list_models(task_id="t1", all_versions=True)
    assert sorted(m.version for m in every) == [1, 2]
    assert store.export_model("pi-1", "tflite", task_id="t1", version=1) == first["tflite"]
    assert store.export_model("pi-1", "tflite", task_id="t1") == second["tflite"]
    with pytest.raises(StorageError, match="with version 3"):
        store.export_model("pi-1", "tflite", task_id="t1", version=3)

    history = store.model_history("pi-1")
    assert [(m.task_id, m.version) for m in history] == [("t1", 1), ("t1", 2), ("t2", 1)]
    with pytest.raises(StorageError, match="unknown device 'pi-404'"):
        store.model_history("pi-404")


def test_best_worst_and_filters(store: Store) -> None:
    register(store, "t1")
    register(store, "t2")
    for i, accuracy in enumerate((0.3, 0.9, 0.6, 0.8, 0.1, 0.5)):
        save(store, "t1", f"pi-{i}", accuracy)
    save(store, "t2", "pi-0", 0.99)
    best = store.list_models(task_id="t1", limit=2)
    assert [m.device_id for m in best] == ["pi-1", "pi-3"]
    worst = store.list_models(task_id="t1", descending=False, limit=2)
    assert [m.device_id for m in worst] == ["pi-4", "pi-0"]
    fastest = store.list_models(task_id="t1", order="latency_ms", descending=False, limit=1)
    assert fastest[0].device_id == "pi-4"
    assert [m.task_id for m in store.list_models(device_id="pi-0")] == ["t2", "t1"]


def test_models_and_tasks_commands(store: Store, store_url: str, capsys, tmp_path: Path) -> None:
    register(store, "t1")
    store.upsert_device(FLEET, "pi-9", presence="online")
    deadline = dt.datetime.now(UTC) + dt.timedelta(minutes=5)
    store.open_round("t1", 1, quorum=2, deadline=deadline)
    fields = {"base_round": 1, "staleness": 0, "weight": 1.0, "num_samples": 5, "metrics": {}}
    for device in ("pi-0", "pi-1"):
        store.record_update("t1", 1, device, payload=device.encode(), **fields)
    store.close_round("t1", 1, aggregate=b"a", closed_by="quorum")
    store.open_round("t1", 2, quorum=2, deadline=deadline)
    store.record_update("t1", 2, "pi-0", payload=b"u2", **{**fields, "base_round": 2})

    out = run(capsys, "tasks", "--db", store_url)
    header, _rule, row = out.splitlines()
    assert header.split()[:5] == ["FLEET", "TASK", "STRATEGY", "STATE", "ROUNDS"]
    assert row.split()[:7] == [FLEET, "t1", "fedmask", "-", "1/3", "2", "0/2"]
    assert "pi-1, pi-9" in row  # a participant and an online device have not answered round 2

    store.set_task_state("t1", "failed", "finalization deadline passed without pi-1")
    status = json.loads(run(capsys, "tasks", "--json", "--task", "t1", "--db", store_url))[0]
    assert (status["state"], status["rounds_total"], status["open_round"]) == ("failed", 3, 2)
    assert "finalization deadline passed" in run(capsys, "tasks", "--db", store_url)

    first = save(store, "t1", "pi-0", 0.4)
    save(store, "t1", "pi-0", 0.8, seed=b"again")
    save(store, "t1", "pi-1", 0.6)
    header, _rule, *rows = run(capsys, "models", "list", "--task", "t1", "--db", store_url).splitlines()
    assert header.split()[3:7] == ["VERSION", "ACCURACY", "TEST", "N"]
    assert "DENSITY" in header and "LATENCY MS" in header
    assert [r.split()[2:5] for r in rows] == [["pi-0", "2", "0.8"], ["pi-1", "1", "0.6"]]
    listed = json.loads(
        run(capsys, "models", "list", "--device", "pi-0", "--all-versions", "--json", "--db", store_url)
    )
    assert sorted(m["version"] for m in listed) == [1, 2]
    assert {m["density"] for m in listed} == {0.2, 0.4}

    worst = run(capsys, "models", "worst", "--task", "t1", "-n", "1", "--db", store_url).splitlines()
    assert worst[2].split()[2] == "pi-1"
    best = run(capsys, "models", "best", "--task", "t1", "--sort", "latency_ms", "--json", "--db", store_url)
    assert [m["device_id"] for m in json.loads(best)] == ["pi-1", "pi-0"]  # 6 ms beats 8 ms

    history = run(capsys, "models", "history", "pi-0", "--db", store_url).splitlines()
    assert [r.split()[3] for r in history[2:]] == ["1", "2"]

    out = tmp_path / "v1.tflite"
    args = ("models", "export", "--task", "t1", "--device", "pi-0", "--version", "1", "--out", str(out))
    run(capsys, *args, "--db", store_url)
    assert out.read_bytes() == first["tflite"]
    assert "name the device once" in usage_error(
        capsys, "models", "export", "--task", "t1", "--out", str(out)
    )
    assert "--task is required" in usage_error(capsys, "models", "best", "--db", store_url)


def test_migration_0004_keeps_existing_models_as_version_1(sqlite_url: str) -> None:
    """A store at 0003 with a model (metrics carrying density and num_test) upgrades to head."""
    engine = sa.create_engine(sqlite_url)
    upgrade(engine, "0003")
    now = dt.datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO fleets (id, name, created_at) VALUES (1, 'f', :t)"), {"t": now})
        c.execute(
            sa.text(
                "INSERT INTO tasks (id, task_id, fleet_pk, spec, seed, weights_digest, strategy, arch, "
                "created_at) VALUES (1, 't', 1, '{}', 1, 'd', 'fedmask', 'mlp', :t)"
            ),
            {"t": now},
        )
        c.execute(
            sa.text(
                "INSERT INTO devices (id, fleet_pk, device_id, first_seen_at, last_seen_at) "
                "VALUES (1, 1, 'pi-1', :t, :t)"
            ),
            {"t": now},
        )
        c.execute(
            sa.text("INSERT INTO blobs (sha256, size_bytes, data, created_at) VALUES ('x', 1, X'00', :t)"),
            {"t": now},
        )
        c.execute(
            sa.text(
                "INSERT INTO personalized_models (task_pk, device_pk, mask_sha256, weights_sha256, "
                "tflite_sha256, accuracy, latency_ms, size_bytes, peak_rss_bytes, metrics, created_at) "
                "VALUES (1, 1, 'x', 'x', 'x', 0.5, 1.0, 1, 1, :m, :t)"
            ),
            {"t": now, "m": json.dumps({"density": 0.25, "num_test": 12.0})},
        )
    upgrade(engine)
    with Store(sqlite_url) as store:
        (model,) = store.list_models(task_id="t")
        assert (model.version, model.density, model.num_test) == (1, 0.25, 12)
        assert store.task_status()[0].state is None
    downgrade(engine, "0003")
    upgrade(engine)
    engine.dispose()
