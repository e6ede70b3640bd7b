"""`fedmask aggregator run`: the cloud side of a fleet's run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmask.config import ConfigError, RunError, add_option
from fedmask.protocol.cli_options import add_broker_options

TASK_EXTRA_KEYS = ("schedule", "task_id")


def register(sub: argparse._SubParsersAction) -> None:
    aggregator = sub.add_parser("aggregator", help="the cloud aggregator service")
    commands = aggregator.add_subparsers(dest="aggregator_command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="run rounds for a fleet's task until every device reported its personalized model",
        description="Publish the task, run asynchronous rounds (quorum or deadline), store every update "
        "before acknowledging it, then collect the devices' personalized models.",
    )
    add_broker_options(run)
    add_option(run, "--fleet", default="default", help="fleet name (topic tree fedmask/v1/<fleet>/...)")
    add_option(
        run, "--task", metavar="FILE", help="task file (YAML/JSON): strategy, arch, num_classes, schedule"
    )
    add_option(run, "--db", default="sqlite:///fedmask.db", help="SQLAlchemy URL of the store")
    add_option(run, "--shared-group", help="MQTT 5 shared-subscription group, for several aggregator workers")
    add_option(run, "--client-id", help="MQTT client id (default fedmask-aggregator-<fleet>)")
    add_option(
        run,
        "--batch-max",
        type=int,
        default=512,  # AggregatorService's DEFAULT_BATCH_MAX (the service is imported only to run)
        help="group commit: most messages stored in one transaction",
    )
    add_option(
        run,
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="group commit: longest a message waits for its batch to fill before it is stored",
    )
    add_option(
        run,
        "--store-writer",
        choices=["thread", "process"],
        default="process",
        help="where a batch's SQL runs: in a child process of its own (more ingest on a multi-core "
        "machine: off the aggregator's interpreter lock) or in a thread of the aggregator",
    )
    run.set_defaults(handler=_run)


def check_task_file(path: str | Path) -> dict[str, Any]:
    """Read a task file and check its keys and names against the code (``ConfigError`` if wrong)."""
    import dataclasses

    from fedmask.config import check_arch_kwargs, check_mask_config, load_config_file, unknown_key_error
    from fedmask.protocol.messages import Schedule
    from fedmask.strategies import TaskSpec, registry

    where = f"task file {path}"
    raw = load_config_file(path)
    valid = [f.name for f in dataclasses.fields(TaskSpec)] + list(TASK_EXTRA_KEYS)
    for key in raw:
        if key not in valid:
            raise unknown_key_error(where, str(key), valid)
    missing = [k for k in ("strategy", "arch", "num_classes") if k not in raw]
    if missing:
        raise ConfigError(
            f"{where}: missing {', '.join(missing)}; a task file names at least strategy, arch and "
            "num_classes (e.g. strategy: fedmask, arch: har_cnn, num_classes: 14)"
        )
    strategies = registry()
    if raw["strategy"] not in strategies:
        raise unknown_key_error(f"{where}: strategy", str(raw["strategy"]), strategies, what="strategy")
    for key in ("arch_kwargs", "mask_config", "hyper", "schedule"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {raw[key]!r}")
    check_arch_kwargs(
        str(raw["arch"]), raw.get("arch_kwargs") or {}, f"{where}: arch_kwargs", f"{where}: arch"
    )
    check_mask_config(raw.get("mask_config") or {}, f"{where}: mask_config")
    schedule_keys = [f.name for f in dataclasses.fields(Schedule)]
    for key in raw.get("schedule") or {}:
        if key not in schedule_keys:
            raise unknown_key_error(f"{where}: schedule", str(key), schedule_keys)
    return raw


def _load_task(path: str, fleet: str) -> Any:
    from fedmask.aggregator.tasks import load_task_file

    check_task_file(path)
    try:
        return load_task_file(path, fleet)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"task file {path}: {exc}") from exc


def _run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from sqlalchemy.exc import OperationalError

    from fedmask.aggregator.service import AggregatorService
    from fedmask.heap import settle_for_service
    from fedmask.protocol.cli_options import brokers_from_args
    from fedmask.storage import Store
    from fedmask.storage.cli import database_url

    if not args.task:
        raise ConfigError(
            "aggregator run: no task; pass --task FILE (or FEDMASK_TASK, or `task:` in --config)"
        )
    if args.batch_max < 1 or args.batch_wait_ms < 0:
        raise ConfigError(
            f"aggregator run: --batch-max {args.batch_max} and --batch-wait-ms {args.batch_wait_ms:g}: "
            "need at least 1 message per batch and a wait of 0 ms or more"
        )
    task = _load_task(args.task, args.fleet)
    broker = brokers_from_args(args)
    url = database_url(args.db)
    try:
        store = Store(url)
        store.upgrade()
    except OperationalError as exc:
        cause = " ".join(str(exc.orig).split())
        raise RunError(
            f"database {url.render_as_string(hide_password=True)}: {cause}; check --db (or FEDMASK_DB) "
            "and that the database server is running and accepts this user"
        ) from exc
    try:
        service = AggregatorService(
            broker,
            args.fleet,
            task,
            store,
            protocol=args.mqtt_protocol,
            client_id=args.client_id,
            shared_group=args.shared_group,
            batch_max=args.batch_max,
            batch_wait_s=args.batch_wait_ms / 1e3,
            store_writer=args.store_writer,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        service.start()
        settle_for_service()  # after start: the rounds and bases it loaded are long-lived too
        logging.getLogger(__name__).info("aggregator serving fleet %s, task %s", args.fleet, task.task_id)
        try:
            while not stop.is_set() and not service.wait(1.0):
                pass
        finally:
            service.stop()
    finally:
        store.close()
    outcome = service.manager.outcome
    if outcome is not None and outcome != "complete":
        raise RunError(f"aggregator run: task {task.task_id}: {outcome}")
    return 0
