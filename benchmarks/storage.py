"""Storage benchmark: durable ingest rate and query times, on SQLite and PostgreSQL.

1. Ingest: ``Store.record_update`` with a 100 KiB payload, one committed transaction each (what the
   aggregator does before acknowledging an update). Baseline, same run and same database: a bare DBAPI
   INSERT of the same bytes into a two-column table plus COMMIT, i.e. the floor any durable store pays.
2. Queries on a store holding R rounds x D devices (default 100 x 1,000 = 100,000 updates, 1,000
   personalized models). The history is bulk-loaded with small payloads (queries read metadata, not
   payload bytes). Baseline: one pass over every update row, ``SELECT count(*), sum(payload_bytes)``.

Prints a table, writes JSON. Times are medians over repeats.

    .venv/bin/python benchmarks/storage.py                       # SQLite and PostgreSQL
    .venv/bin/python benchmarks/storage.py --engines sqlite --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text
from table import print_table, write_report

from fedmask.storage import RoundDetail, RoundInfo, Store
from fedmask.storage.schema import (
    Aggregate,
    Blob,
    Device,
    Fleet,
    PersonalizedModel,
    Rejection,
    Round,
    Task,
    Update,
)

UTC = dt.timezone.utc
FLEET, TASK = "bench-fleet", "bench-task"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{database}"


# -- databases -----------------------------------------------------------------------------------------


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="fedmask-bench-") as folder:
        yield f"sqlite:///{Path(folder) / 'bench.db'}"


@contextmanager
def postgres_database(admin_conninfo: str) -> Iterator[str]:
    import psycopg

    name = f"fedmask_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_conninfo, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.format(database=name)
    finally:
        with psycopg.connect(admin_conninfo, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_bytes(store: Store) -> int:
    if store.dialect == "sqlite":
        path = Path(store.url.database)
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    with store.engine.connect() as connection:
        return connection.scalar(text("SELECT pg_database_size(current_database())"))


# -- ingest --------------------------------------------------------------------------------------------


def time_each(calls: list[Callable[[], Any]]) -> list[float]:
    seconds = []
    for call in calls:
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def raw_writer(url: str) -> tuple[Callable[[int, bytes], None], Callable[[], None]]:
    """Baseline: the bare driver, one INSERT + COMMIT per payload, same durability settings as the store.
    Returns (insert, close)."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE raw_baseline (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")

        def insert(_index: int, data: bytes) -> None:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO raw_baseline (payload) VALUES (?)", (data,))
            connection.execute("COMMIT")

    else:
        import psycopg

        connection = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
        connection.execute("CREATE TABLE raw_baseline (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)")
        connection.commit()

        def insert(_index: int, data: bytes) -> None:
            connection.execute("INSERT INTO raw_baseline (payload) VALUES (%s)", (data,))
            connection.commit()

    return insert, connection.close


def store_writer(store: Store, task_id: str, devices: int) -> Callable[[int, bytes], None]:
    """``Store.record_update`` into an open round whose devices announced themselves (steady state)."""
    store.register_task(
        FLEET, task_id, spec={}, seed=1, weights_digest="d" * 64, strategy="fedmask", arch="b"
    )
    store.open_round(task_id, 1, quorum=1, deadline=dt.datetime.now(UTC) + dt.timedelta(hours=1))
    for index in range(devices):
        store.upsert_device(FLEET, f"dev-{index:05d}", presence="online")

    def insert(index: int, data: bytes) -> None:
        fields = {"base_round": 0, "staleness": 0, "weight": 1.0, "num_samples": 64, "metrics": {"loss": 0.5}}
        assert store.record_update(task_id, 1, f"dev-{index:05d}", payload=data, **fields)

    return insert


def ingest_rows(engine: str, url: str, inserts: int, payload_bytes: int) -> list[dict[str, Any]]:
    """Baseline and store variants take turns on each payload, so all see the same disk and CPU weather."""
    baseline_label = "raw driver INSERT+COMMIT (baseline)"
    raw_insert, raw_close = raw_writer(url)
    variants: dict[str, dict[str, Any]] = {"store": {}}
    if engine == "sqlite":
        variants["store, synchronous=NORMAL"] = {"sqlite_synchronous": "NORMAL"}
    stores = {label: Store(url, **options) for label, options in variants.items()}
    writers = {baseline_label: raw_insert}
    for index, (label, store) in enumerate(stores.items()):
        store.upgrade()
        writers[label] = store_writer(store, f"{TASK}-ingest-{index}", inserts)
    seconds: dict[str, list[float]] = {label: [] for label in writers}
    try:
        for index in range(inserts):
            data = os.urandom(payload_bytes)
            for label, insert in writers.items():
                start = time.perf_counter()
                insert(index, data)
                seconds[label].append(time.perf_counter() - start)
    finally:
        raw_close()
        for store in stores.values():
            store.close()
    baseline = seconds[baseline_label]
    return [ingest_row(engine, label, times, baseline, payload_bytes) for label, times in seconds.items()]


def ingest_row(
    engine: str, label: str, seconds: list[float], baseline: list[float], size: int
) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "engine": engine,
        "what": label,
        "n": len(seconds),
        "payload_bytes": size,
        "median_ms": median * 1e3,
        "p90_ms": sorted(seconds)[int(0.9 * (len(seconds) - 1))] * 1e3,
        "updates_per_s": len(seconds) / sum(seconds),
        "x_baseline": median / statistics.median(baseline),
    }


# -- queries -------------------------------------------------------------------------------------------


def bulk_load(store: Store, rounds: int, devices: int) -> None:
    """A finished run: ``rounds`` closed rounds in which every device sent an update, one rejection per
    round, one personalized model per device. Bulk inserts through the store's own tables."""
    t0 = dt.datetime(2026, 1, 1, tzinfo=UTC)
    names = [f"dev-{d:05d}" for d in range(devices)]
    with store.engine.begin() as c:
        fleet_pk = c.execute(insert(Fleet).values(name=FLEET, created_at=t0).returning(Fleet.id)).scalar_one()
        task = {"task_id": TASK, "fleet_pk": fleet_pk, "spec": {}, "seed": 1, "weights_digest": "d" * 64}
        task.update(strategy="fedmask", arch="bench", created_at=t0)
        task_pk = c.execute(insert(Task).values(**task).returning(Task.id)).scalar_one()
        seen = {"presence": "online", "presence_at": t0, "first_seen_at": t0, "last_seen_at": t0}
        c.execute(insert(Device), [{"fleet_pk": fleet_pk, "device_id": n, **seen} for n in names])
        device_pks = dict(c.execute(text("SELECT device_id, id FROM devices")).all())
        for r in range(1, rounds + 1):
            opened = t0 + dt.timedelta(minutes=r)
            closed = {
                "state": "closed",
                "closed_at": opened + dt.timedelta(seconds=50),
                "closed_by": "quorum",
            }
            round_row = {"task_pk": task_pk, "round_no": r, "quorum": devices // 2, "deadline": opened}
            round_pk = c.execute(
                insert(Round).values(**round_row, **closed, opened_at=opened).returning(Round.id)
            ).scalar_one()
            payloads = {n: b"%d/%s" % (r, n.encode()) for n in names}
            aggregate = b"aggregate %d" % r
            c.execute(insert(Blob), [blob_row(p, opened) for p in [*payloads.values(), aggregate]])
            update = {
                "task_pk": task_pk,
                "round_pk": round_pk,
                "base_round": r - 1,
                "staleness": 0,
                "weight": 1.0,
                "num_samples": 64,
            }
            update.update(payload_bytes=100 * 1024, metrics={"loss": 0.5}, received_at=opened)
            c.execute(
                insert(Update),
                [
                    {**update, "device_pk": device_pks[n], "payload_sha256": sha(p)}
                    for n, p in payloads.items()
                ],
            )
            c.execute(
                insert(Aggregate).values(
                    round_pk=round_pk,
                    payload_sha256=sha(aggregate),
                    payload_bytes=len(aggregate),
                    num_updates=devices,
                    created_at=opened,
                )
            )
            c.execute(
                insert(Rejection).values(
                    fleet_pk=fleet_pk,
                    task_id=TASK,
                    round_no=r,
                    device_id="intruder",
                    reason="unknown_device",
                    detail="not registered",
                    received_at=opened,
                )
            )
        files = {n: b"model file of %s" % n.encode() for n in names}
        c.execute(insert(Blob), [blob_row(f, t0) for f in files.values()])
        scores = {
            "version": 1,
            "latency_ms": 1.0,
            "size_bytes": 1,
            "peak_rss_bytes": 1,
            "metrics": {},
            "created_at": t0,
        }
        c.execute(
            insert(PersonalizedModel),
            [
                {
                    "task_pk": task_pk,
                    "device_pk": device_pks[n],
                    "accuracy": (i % 100) / 100,
                    **dict.fromkeys(("mask_sha256", "weights_sha256", "tflite_sha256"), sha(f)),
                    **scores,
                }
                for i, (n, f) in enumerate(files.items())
            ],
        )
    if store.dialect == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("VACUUM ANALYZE"))  # as autovacuum would have by now


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_row(data: bytes, created_at: dt.datetime) -> dict[str, Any]:
    return {"sha256": sha(data), "size_bytes": len(data), "data": data, "created_at": created_at}


def query_rows(engine: str, store: Store, rounds: int, devices: int, repeats: int) -> list[dict[str, Any]]:
    def full_scan() -> Any:
        with store.engine.connect() as connection:
            return connection.execute(text("SELECT count(*), sum(payload_bytes) FROM updates")).one()

    middle = rounds // 2 or 1
    queries: list[tuple[str, Callable[[], Any]]] = [
        ("one pass over all updates (baseline)", full_scan),
        ("list_devices(fleet)", lambda: store.list_devices(FLEET)),
        ("list_rounds(task)", lambda: store.list_rounds(task_id=TASK)),
        (f"round_detail(task, {middle})", lambda: store.round_detail(TASK, middle)),
        ("latest_round(task) (resume)", lambda: store.latest_round(TASK)),
        ("list_models(fleet, min_accuracy=0.9)", lambda: store.list_models(fleet=FLEET, min_accuracy=0.9)),
        ("export_model(device, tflite)", lambda: store.export_model("dev-00007", "tflite")),
    ]
    results = []
    for label, call in queries:
        call()  # warm the caches the way a long-running service has them
        results.append((label, statistics.median(time_each([call] * repeats)), call()))
    baseline = results[0][1]
    return [
        {
            "engine": engine,
            "query": label,
            "rows": result_rows(value),
            "median_ms": seconds * 1e3,
            "x_baseline": seconds / baseline,
            "history": f"{rounds} rounds x {devices} devices",
        }
        for label, seconds, value in results
    ]


def result_rows(value: Any) -> int:
    """How many records a query produced: list items, a round's updates or participants, else 1."""
    if isinstance(value, list):
        return len(value)
    if isinstance(value, RoundDetail):
        return len(value.updates)
    if isinstance(value, RoundInfo):
        return len(value.participants)
    return 1


# -- report --------------------------------------------------------------------------------------------


# (key, header, format) of each printed column.
INGEST_COLUMNS = [
    ("engine", "ENGINE", "{}"),
    ("what", "WHAT", "{}"),
    ("n", "N", "{}"),
    ("median_ms", "MEDIAN MS", "{:.2f}"),
    ("p90_ms", "P90 MS", "{:.2f}"),
    ("updates_per_s", "UPDATES/S", "{:.0f}"),
    ("x_baseline", "x BASELINE", "{:.2f}"),
]
QUERY_COLUMNS = [
    ("engine", "ENGINE", "{}"),
    ("query", "QUERY", "{}"),
    ("rows", "ROWS", "{}"),
    ("median_ms", "MEDIAN MS", "{:.2f}"),
    ("x_baseline", "x BASELINE", "{:.2f}"),
]
PRUNE_COLUMNS = [
    ("engine", "ENGINE", "{}"),
    ("keep_last", "prune(keep_last=N)", "{}"),
    ("blobs_freed", "BLOBS FREED", "{}"),
    ("ms", "MS", "{:.0f}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engines", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--inserts", type=int, default=200, help="updates stored per ingest measurement")
    parser.add_argument("--payload-kib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7, help="runs per query; the median is reported")
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="psycopg conninfo allowed to CREATE DATABASE")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_storage.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.inserts, args.rounds, args.devices, args.repeats = 20, 10, 100, 3

    ingest: list[dict[str, Any]] = []
    queries: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    prunes: list[dict[str, Any]] = []
    for engine in args.engines:
        database = sqlite_database() if engine == "sqlite" else postgres_database(args.pg_admin)
        with database as url:
            print(f"[{engine}] ingest: {args.inserts} x {args.payload_kib} KiB ...", file=sys.stderr)
            ingest += ingest_rows(engine, url, args.inserts, args.payload_kib * 1024)
        database = sqlite_database() if engine == "sqlite" else postgres_database(args.pg_admin)
        with database as url, Store(url) as store:
            store.upgrade()
            print(f"[{engine}] loading {args.rounds} rounds x {args.devices} devices ...", file=sys.stderr)
            start = time.perf_counter()
            bulk_load(store, args.rounds, args.devices)
            print(f"[{engine}] loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr)
            sizes[engine] = database_bytes(store)
            queries += query_rows(engine, store, args.rounds, args.devices, args.repeats)
            keep = max(args.rounds // 10, 1)
            start = time.perf_counter()  # once: a second prune has nothing left to free
            freed = store.prune(keep_last=keep)
            prunes.append({"engine": engine, "keep_last": keep, "blobs_freed": freed})
            prunes[-1]["ms"] = (time.perf_counter() - start) * 1e3

    ingest_title = f"Durable ingest: one committed transaction per update, {args.payload_kib} KiB payload"
    print_table(ingest_title, ingest, INGEST_COLUMNS)
    query_title = f"Queries on {args.rounds} rounds x {args.devices} devices (median of {args.repeats})"
    print_table(query_title, queries, QUERY_COLUMNS)
    print_table("Housekeeping on the same store (one run; writers wait while it runs)", prunes, PRUNE_COLUMNS)
    write_report(
        args.out,
        "storage",
        argv,
        args,
        database_bytes_after_load=sizes,
        ingest=ingest,
        queries=queries,
        prune=prunes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
