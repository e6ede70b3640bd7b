"""How long `fedmask report` and a dashboard refresh take on a large stored run.

The store holds the history benchmarks/storage.py builds (ROUNDS closed rounds in which each of DEVICES
devices sent an update, a rejection per round, a model per device). Measured, median of --repeats runs:

- baseline: one pass over all updates, ``SELECT count(*), sum(payload_bytes) FROM updates``;
- ``task_history``: the read behind both views (read-only engine, one transaction);
- a dashboard refresh of a task: ``/api/tasks/{task}`` (history, then the report model, then JSON),
  served by the real app (uvicorn on a loopback port, fetched over HTTP), its history cache off so
  every request reads the store;
- one plot (``/api/tasks/{task}/plots/accuracy.png`` and ``device_accuracy.png``), history read included;
- the whole ``fedmask report`` (history, every plot, Markdown and HTML written).

    .venv/bin/python benchmarks/report.py [--rounds 100 --devices 1000] [--engines sqlite,postgresql]

Writes runs/bench_report.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sqlalchemy import text
from table import print_table

from fedmask.cli import main as fedmask
from fedmask.storage import Store
from fedmask.storage.engine import read_transaction
from fedmask.storage.reporting import read_only_engine, task_history
from storage import PG_ADMIN, TASK, bulk_load, postgres_database, sqlite_database


def median_ms(call: Callable[[], Any], repeats: int) -> float:
    call()  # warm caches, as a long-running dashboard has them
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


def serve(engine: Any) -> tuple[str, Callable[[], None]]:
    import uvicorn

    from fedmask.report.dashboard import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, refresh_s=0.0), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("the dashboard did not start within 30 s")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)

    return f"http://127.0.0.1:{port}", stop


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=300) as response:
        return response.read()


def measure(engine_name: str, url: str, rounds: int, devices: int, repeats: int) -> list[dict[str, Any]]:
    with Store(url) as store:
        store.upgrade()
        bulk_load(store, rounds, devices)
    engine = read_only_engine(url)
    base, stop = serve(engine)
    out = Path(tempfile.mkdtemp(prefix="fedmask-report-bench-"))

    def full_scan() -> Any:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*), sum(payload_bytes) FROM updates")).one()

    def history() -> Any:
        with read_transaction(engine) as connection:
            return task_history(connection, TASK)

    def report() -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # its summary table, once per repeat
            assert fedmask(["report", "--db", url, "--task", TASK, "--out", str(out)]) == 0

    cases: list[tuple[str, Callable[[], Any], int]] = [
        ("one pass over all updates (baseline)", full_scan, repeats),
        ("task_history(task)", history, repeats),
        ("dashboard: GET /api/tasks/{task}", lambda: fetch(f"{base}/api/tasks/{TASK}"), repeats),
        ("dashboard: accuracy.png", lambda: fetch(f"{base}/api/tasks/{TASK}/plots/accuracy.png"), repeats),
        (
            "dashboard: device_accuracy.png",
            lambda: fetch(f"{base}/api/tasks/{TASK}/plots/device_accuracy.png"),
            repeats,
        ),
        ("fedmask report --task (all plots, md + html)", report, max(1, repeats // 3)),
    ]
    try:
        timed = [(label, median_ms(call, n)) for label, call, n in cases]
    finally:
        stop()
        engine.dispose()
    baseline = timed[0][1]
    return [
        {
            "engine": engine_name,
            "what": label,
            "median_ms": ms,
            "x_baseline": ms / baseline,
            "history": f"{rounds} rounds x {devices} devices",
        }
        for label, ms in timed
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is reported")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="psycopg conninfo allowed to CREATE DATABASE")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_report.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.devices, args.repeats = 5, 50, 3
    rows = []
    for name in args.engines.split(","):
        database = sqlite_database() if name == "sqlite" else postgres_database(args.pg_admin)
        with database as url:
            rows += measure(name, url, args.rounds, args.devices, args.repeats)
    print_table(
        f"report and dashboard, {args.rounds} rounds x {args.devices} devices (median of {args.repeats})",
        rows,
        [
            ("engine", "engine", "{}"),
            ("what", "what", "{}"),
            ("median_ms", "median ms", "{:.1f}"),
            ("x_baseline", "x baseline", "{:.2f}"),
        ],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
