"""`fedmask report` and `fedmask dashboard`. Kept light: nothing heavy is imported to build the parser."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmask.config import ConfigError, RunError, add_option

logger = logging.getLogger(__name__)

DEFAULT_OUT = "runs/report"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050


def register(subparsers: argparse._SubParsersAction) -> None:
    from fedmask.storage.cli import DEFAULT_DB

    report = subparsers.add_parser(
        "report",
        help="a stored task's report (Markdown + self-contained HTML with plots); several tasks side by side",
        description="Write report.md, report.html (plots embedded) and the plots as PNG for the named tasks "
        "of the store: a deployment's, or a simulation's run with `fedmask simulate --db`. With two or more "
        "--task the tasks are compared side by side.",
    )
    add_option(report, "--db", default=DEFAULT_DB, metavar="URL", help="database URL (env FEDMASK_DB)")
    add_option(
        report,
        "--task",
        action="append",
        metavar="ID",
        help="task id, repeatable to compare tasks (default: every task in the store)",
    )
    add_option(report, "--out", default=DEFAULT_OUT, metavar="DIR", help="directory the report is written to")
    report.set_defaults(handler=_report)

    dashboard = subparsers.add_parser(
        "dashboard",
        help="a live, read-only web view of the store: fleet presence, open round, rounds, models, plots",
    )
    add_option(dashboard, "--db", default=DEFAULT_DB, metavar="URL", help="database URL (env FEDMASK_DB)")
    add_option(
        dashboard,
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (loopback by default: put a proxy with TLS and a login in front "
        "to reach it from elsewhere)",
    )
    add_option(dashboard, "--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    add_option(dashboard, "--refresh", type=float, default=5.0, metavar="S", help="page refresh period")
    dashboard.set_defaults(handler=_dashboard)


def _task_ids(value: Any) -> list[str]:
    """--task flags (a list), FEDMASK_TASK or the config file (a comma-separated string or a list)."""
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [t.strip() for item in items for t in str(item).split(",") if t.strip()]


@contextlib.contextmanager
def read_only_store(db: str) -> Iterator[Any]:
    """A read-only engine on ``--db``, checked to hold the schema this code reads; storage and
    connection failures become ``RunError`` (exit 1)."""
    from sqlalchemy.exc import OperationalError

    from fedmask.storage import StorageError, migrate
    from fedmask.storage.cli import database_url
    from fedmask.storage.engine import read_transaction
    from fedmask.storage.reporting import read_only_engine

    url = database_url(db)
    where = url.render_as_string(hide_password=True)
    engine = None
    try:
        if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
            raise StorageError(
                f"SQLite database {url.database} does not exist; check --db (a run creates it: "
                "`fedmask aggregator run`, or `fedmask simulate --db`)"
            )
        engine = read_only_engine(url)
        with read_transaction(engine) as connection:
            current = migrate.current_revision(connection)
        if current != migrate.head_revision():
            found = "no fedmask schema" if current is None else f"schema revision {current}"
            raise StorageError(
                f"database {where} has {found}, expected {migrate.head_revision()}; run `fedmask db upgrade`"
            )
        yield engine
    except StorageError as exc:
        raise RunError(str(exc)) from exc
    except OperationalError as exc:
        cause = " ".join(str(exc.orig).split())
        raise RunError(
            f"database {where}: {cause}; check --db (or FEDMASK_DB) and that the database server is "
            "running and accepts this user"
        ) from exc
    finally:
        if engine is not None:
            engine.dispose()


def _report(args: argparse.Namespace) -> int:
    from fedmask.report import render
    from fedmask.report.load import load_reports

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"report: --out {out} is a file; expected a directory")
    with read_only_store(args.db) as engine:
        reports = load_reports(engine, _task_ids(args.task))
    written = render.write(reports, out)
    print(render.markdown_table(render.summary_table(reports)))
    pngs = len(written["images"])
    print(f"report in {written['html']} (self-contained) and {written['markdown']} with {pngs} PNGs")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ConfigError(f"dashboard: --port {args.port}; expected 1..65535")
    if args.refresh <= 0:
        raise ConfigError(f"dashboard: --refresh {args.refresh}; expected seconds > 0")
    from fedmask.report.dashboard import serve

    with read_only_store(args.db) as engine:
        print(f"dashboard on http://{args.host}:{args.port}/ (read-only; Ctrl-C stops it)", flush=True)
        serve(engine, args.host, args.port, refresh_s=args.refresh)
    return 0
