"""`fedmask db`, `fedmask devices`, `fedmask rounds`, `fedmask round` and `fedmask models`.

Kept light: SQLAlchemy is imported by the handlers, not when the command line is built.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmask.config import ConfigError, RunError, add_option

if TYPE_CHECKING:
    from fedmask.storage.store import Store

logger = logging.getLogger(__name__)

DEFAULT_DB = "sqlite:///fedmask.db"
EXPORT_FORMATS = ("tflite", "torch", "mask")
# storage.records.MODEL_ORDERS, spelled here so building the parser imports no SQLAlchemy.
MODEL_ORDERS = ("accuracy", "latency_ms", "size_bytes", "density", "num_test", "created_at")
# Columns where a smaller number is the better model.
SMALLER_IS_BETTER = ("latency_ms", "size_bytes", "density")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the storage subcommands to the `fedmask` command."""
    db = subparsers.add_parser("db", help="create, migrate and tidy the SQL store")
    db_actions = db.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    upgrade = db_actions.add_parser(
        "upgrade", help="create or migrate the database schema to the newest version"
    )
    _add_db(upgrade)
    upgrade.set_defaults(handler=_upgrade)
    prune = db_actions.add_parser(
        "prune", help="free the update payloads of all but the last N rounds of each task (metadata stays)"
    )
    prune.add_argument(
        "--keep", type=int, required=True, metavar="N", help="rounds per task whose payloads stay"
    )
    _add_db(prune)
    prune.set_defaults(handler=_prune)

    devices = subparsers.add_parser("devices", help="devices of a fleet with presence and last seen")
    add_option(devices, "--fleet", help="fleet name (all fleets if not given)")
    _add_db(devices, json_output=True)
    devices.set_defaults(handler=_devices)

    rounds = subparsers.add_parser("rounds", help="rounds with participation and timing")
    add_option(rounds, "--fleet", help="only this fleet")
    add_option(rounds, "--task", help="only this task")
    _add_db(rounds, json_output=True)
    rounds.set_defaults(handler=_rounds)

    one_round = subparsers.add_parser(
        "round", help="one round in detail: who sent what, what was rejected and why"
    )
    one_round.add_argument("round_no", type=int, metavar="N", help="round number")
    add_option(one_round, "--task", help="task id (required)")
    _add_db(one_round, json_output=True)
    one_round.set_defaults(handler=_round)

    tasks = subparsers.add_parser(
        "tasks", help="each task's status: rounds done of total, running/finalizing/done/failed, missing"
    )
    add_option(tasks, "--fleet", help="only this fleet")
    add_option(tasks, "--task", help="only this task")
    _add_db(tasks, json_output=True)
    tasks.set_defaults(handler=_tasks)

    models = subparsers.add_parser(
        "models", help="the model registry: list, a device's history, best/worst devices, export"
    )
    model_actions = models.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    listing = model_actions.add_parser(
        "list", help="personalized models (each device's newest version per task), best accuracy first"
    )
    _add_model_filters(listing)
    listing.add_argument("--all-versions", action="store_true", help="every version, not only the newest")
    listing.add_argument(
        "--min-accuracy", type=float, metavar="A", help="only models with accuracy >= A (0..1)"
    )
    listing.add_argument("--sort", choices=MODEL_ORDERS, default="accuracy", help="column to sort by")
    listing.add_argument("--ascending", action="store_true", help="smallest first")
    listing.add_argument("-n", "--limit", type=int, metavar="N", help="at most N rows")
    _add_db(listing, json_output=True)
    listing.set_defaults(handler=_models_list)

    for name, best in (("best", True), ("worst", False)):
        ranking = model_actions.add_parser(
            name, help=f"the {name} devices of a task by their newest model (accuracy unless --sort)"
        )
        add_option(ranking, "--task", help="task id (required)")
        add_option(ranking, "--fleet", help="only this fleet")
        ranking.add_argument("-n", "--limit", type=int, default=5, metavar="N", help="how many (default 5)")
        ranking.add_argument(
            "--sort",
            choices=MODEL_ORDERS,
            default="accuracy",
            help="rank by this column (latency_ms and size_bytes: smaller is better)",
        )
        _add_db(ranking, json_output=True)
        ranking.set_defaults(handler=_models_ranking, best=best)

    history = model_actions.add_parser("history", help="every model version of one device, oldest first")
    history.add_argument("history_device", metavar="DEVICE", help="device id")
    add_option(history, "--fleet", help="only this fleet")
    _add_db(history, json_output=True)
    history.set_defaults(handler=_models_history)

    export = model_actions.add_parser(
        "export", help="write one version of a device's model, byte-identical to the stored one"
    )
    export.add_argument("device_id", nargs="?", metavar="DEVICE", help="device id (or --device)")
    export.add_argument("--device", dest="device_flag", metavar="ID", help="device id")
    export.add_argument(
        "--format",
        dest="export_format",
        choices=EXPORT_FORMATS,
        default="tflite",
        help="tflite: the .tflite file (default); torch: fine-tuned weights (safetensors); mask: the "
        "encoded mask",
    )
    export.add_argument(
        "-o",
        "--out",
        "--output",
        dest="output",
        type=Path,
        required=True,
        metavar="PATH",
        help="file to write",
    )
    add_option(export, "--task", help="task id (default: the device's most recent model)")
    export.add_argument("--version", type=int, metavar="V", help="model version (default: the newest)")
    _add_db(export)
    export.set_defaults(handler=_models_export)


def _add_model_filters(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--fleet", help="only this fleet")
    add_option(parser, "--task", help="only this task")
    parser.add_argument("--device", metavar="ID", help="only this device")


def _add_db(parser: argparse.ArgumentParser, *, json_output: bool = False) -> None:
    add_option(parser, "--db", default=DEFAULT_DB, metavar="URL", help="database URL (env FEDMASK_DB)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


# -- handlers ------------------------------------------------------------------------------------------


def _upgrade(args: argparse.Namespace) -> int:
    return _run(args, _print_upgrade, must_exist=False)


def _print_upgrade(store: Store) -> None:
    from fedmask.storage.migrate import head_revision

    store.upgrade()
    print(f"{store.url.render_as_string(hide_password=True)}: schema at revision {head_revision()} (newest)")


def _prune(args: argparse.Namespace) -> int:
    if args.keep < 0:
        raise ConfigError(f"db prune: --keep {args.keep}; expected a number of rounds >= 0")
    return _run(args, lambda store: print(f"freed {store.prune(args.keep)} blobs"))


def _devices(args: argparse.Namespace) -> int:
    from fedmask.storage import render

    def show(store: Store) -> None:
        devices = store.list_devices(args.fleet)
        if args.json:
            print(render.to_json(devices))
            return
        rows = [
            (
                d.fleet,
                d.device_id,
                d.presence,
                render.timestamp(d.last_seen_at),
                render.timestamp(d.first_seen_at),
                d.updates,
            )
            for d in devices
        ]
        print(render.table(("FLEET", "DEVICE", "PRESENCE", "LAST SEEN", "FIRST SEEN", "UPDATES"), rows))

    return _run(args, show)


def _rounds(args: argparse.Namespace) -> int:
    from fedmask.storage import render

    def show(store: Store) -> None:
        rounds = store.list_rounds(fleet=args.fleet, task_id=args.task)
        if args.json:
            print(render.to_json(rounds))
            return
        rows = [
            (
                r.fleet,
                r.task_id,
                r.round_no,
                r.state,
                f"{r.participants}/{r.quorum}",
                r.rejections,
                render.size(r.payload_bytes),
                render.timestamp(r.opened_at),
                render.duration(r.duration_s),
                r.closed_by,
            )
            for r in rounds
        ]
        headers = (
            "FLEET",
            "TASK",
            "ROUND",
            "STATE",
            "UPDATES/QUORUM",
            "REJECTED",
            "BYTES",
            "OPENED",
            "TOOK",
            "CLOSED BY",
        )
        print(render.table(headers, rows))

    return _run(args, show)


def _round(args: argparse.Namespace) -> int:
    from fedmask.storage import StorageError, render

    if args.task is None:
        raise ConfigError("round: --task is required (or FEDMASK_TASK, or `task:` in the config file)")

    def show(store: Store) -> None:
        detail = store.round_detail(args.task, args.round_no)
        if detail is None:
            raise StorageError(f"task {args.task!r} has no round {args.round_no}")
        if args.json:
            print(render.to_json(detail))
            return
        info = detail.round
        closed = (
            f"closed by {info.closed_by} at {render.timestamp(info.closed_at)}" if info.closed_at else "open"
        )
        print(f"round {info.round_no} of task {info.task_id} (fleet {detail.fleet}): {closed}")
        opened, deadline = render.timestamp(info.opened_at), render.timestamp(info.deadline)
        print(f"opened {opened}, deadline {deadline}, quorum {info.quorum}")
        print(f"\naccepted updates ({len(detail.updates)}):")
        update_rows = [
            (
                u.device_id,
                u.base_round,
                u.staleness,
                round(u.weight, 4),
                u.num_samples,
                render.size(u.payload_bytes),
                u.payload_sha256[:12],
                "pruned" if u.payload_pruned else "kept",
                render.timestamp(u.received_at),
            )
            for u in detail.updates
        ]
        headers = (
            "DEVICE",
            "BASE",
            "STALENESS",
            "WEIGHT",
            "SAMPLES",
            "BYTES",
            "SHA256",
            "PAYLOAD",
            "RECEIVED",
        )
        print(render.table(headers, update_rows))
        print(f"\nrejected messages ({len(detail.rejections)}):")
        rejection_rows = [
            (r.device_id, r.reason, r.detail, render.size(r.payload_size), render.timestamp(r.received_at))
            for r in detail.rejections
        ]
        print(render.table(("DEVICE", "REASON", "DETAIL", "BYTES", "RECEIVED"), rejection_rows))
        aggregate = detail.aggregate
        if aggregate is not None:
            print(
                f"\naggregate: {render.size(aggregate.size_bytes)} from {aggregate.num_updates} updates, "
                f"sha256 {aggregate.sha256}"
            )

    return _run(args, show)


def _tasks(args: argparse.Namespace) -> int:
    from fedmask.storage import render

    def show(store: Store) -> None:
        statuses = store.task_status(fleet=args.fleet, task_id=args.task)
        if args.json:
            print(render.to_json(statuses))
            return
        rows = [
            (
                t.fleet,
                t.task_id,
                t.strategy,
                t.state or "-",
                f"{t.rounds_closed}/{t.rounds_total if t.rounds_total is not None else '?'}",
                t.open_round,
                f"{t.models}/{t.participants}",
                render.listing(t.missing),
                render.timestamp(t.state_at),
            )
            for t in statuses
        ]
        headers = ("FLEET", "TASK", "STRATEGY", "STATE", "ROUNDS", "OPEN", "MODELS", "MISSING", "SINCE")
        print(render.table(headers, rows))
        for t in statuses:
            if t.outcome:
                print(f"{t.task_id}: {t.outcome}")

    return _run(args, show)


def _model_rows(models: list) -> str:
    from fedmask.storage import render

    rows = [
        (
            m.fleet,
            m.task_id,
            m.device_id,
            m.version,
            round(m.accuracy, 4),
            m.num_test,
            None if m.density is None else round(m.density, 4),
            round(m.latency_ms, 3),
            render.size(m.size_bytes),
            render.size(m.peak_rss_bytes),
            render.timestamp(m.created_at),
        )
        for m in models
    ]
    headers = (
        "FLEET",
        "TASK",
        "DEVICE",
        "VERSION",
        "ACCURACY",
        "TEST N",
        "DENSITY",
        "LATENCY MS",
        "SIZE",
        "PEAK RSS",
        "CREATED",
    )
    return render.table(headers, rows)


def _models_list(args: argparse.Namespace) -> int:
    from fedmask.storage import render

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"models list: -n {args.limit}; expected a number of rows >= 1")

    def show(store: Store) -> None:
        models = store.list_models(
            fleet=args.fleet,
            task_id=args.task,
            min_accuracy=args.min_accuracy,
            device_id=args.device,
            all_versions=args.all_versions,
            order=args.sort,
            descending=not args.ascending,
            limit=args.limit,
        )
        print(render.to_json(models) if args.json else _model_rows(models))

    return _run(args, show)


def _models_ranking(args: argparse.Namespace) -> int:
    from fedmask.storage import render

    which = "best" if args.best else "worst"
    if args.task is None:
        raise ConfigError(
            f"models {which}: --task is required (or FEDMASK_TASK, or `task:` in the config file)"
        )
    if args.limit < 1:
        raise ConfigError(f"models {which}: -n {args.limit}; expected a number of devices >= 1")
    # Best = highest accuracy (or test set, ...), but lowest latency, size or density.
    descending = args.best != (args.sort in SMALLER_IS_BETTER)

    def show(store: Store) -> None:
        models = store.list_models(
            fleet=args.fleet, task_id=args.task, order=args.sort, descending=descending, limit=args.limit
        )
        print(render.to_json(models) if args.json else _model_rows(models))

    return _run(args, show)


def _models_history(args: argparse.Namespace) -> int:
    from fedmask.storage import render

    def show(store: Store) -> None:
        models = store.model_history(args.history_device, fleet=args.fleet)
        print(render.to_json(models) if args.json else _model_rows(models))

    return _run(args, show)


def _models_export(args: argparse.Namespace) -> int:
    output: Path = args.output
    if (args.device_id is None) == (args.device_flag is None):
        raise ConfigError("models export: name the device once: DEVICE or --device ID")
    device = args.device_id or args.device_flag
    if args.version is not None and args.version < 1:
        raise ConfigError(f"models export: --version {args.version}; versions start at 1")
    if not output.parent.is_dir():
        raise ConfigError(f"models export: -o {output}: directory {output.parent} does not exist")

    def export(store: Store) -> None:
        data = store.export_model(device, args.export_format, task_id=args.task, version=args.version)
        # Write beside the target and rename, so a reader never sees a half-written model file.
        partial = output.with_name(f".{output.name}.partial")
        partial.write_bytes(data)
        os.replace(partial, output)
        print(f"wrote {output} ({len(data)} bytes, {args.export_format})")

    return _run(args, export)


def database_url(value: str) -> Any:
    """``--db`` parsed (psycopg for PostgreSQL); a malformed or unsupported URL is a ``ConfigError``."""
    from fedmask.storage import StorageError
    from fedmask.storage.engine import normalize_url

    try:
        return normalize_url(value)
    except StorageError as exc:
        raise ConfigError(f"--db: {exc}; e.g. sqlite:///fedmask.db or postgresql://USER@HOST/DB") from exc


def _run(args: argparse.Namespace, action: Any, *, must_exist: bool = True) -> int:
    """Open the store named by --db and run ``action`` on it; storage errors become ``RunError`` (exit 1)."""
    from sqlalchemy.exc import OperationalError

    from fedmask.storage import StorageError, Store

    url = database_url(args.db)
    try:
        if must_exist and url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
            raise StorageError(
                f"SQLite database {url.database} does not exist; "
                f"create it with `fedmask db upgrade --db {args.db}`"
            )
        with Store(url) as store:
            if must_exist:
                store.check_schema()
            action(store)
    except StorageError as exc:
        raise RunError(str(exc)) from exc
    except OperationalError as exc:
        where = url.render_as_string(hide_password=True)
        cause = " ".join(str(exc.orig).split())
        raise RunError(
            f"database {where}: {cause}; check --db (or FEDMASK_DB) and that the database server is "
            "running and accepts this user"
        ) from exc
    return 0
