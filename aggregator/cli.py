"""`fedmask aggregator run`: the cloud side of a fleet's run."""

from __future__ import annotations

import argparse

from fedmask.config import add_option
from fedmask.protocol.cli_options import add_broker_options


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
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from fedmask.aggregator.service import AggregatorService
    from fedmask.aggregator.tasks import load_task_file
    from fedmask.protocol.cli_options import broker_from_args
    from fedmask.storage import Store

    if not args.task:
        raise SystemExit("fedmask aggregator run: --task FILE is required (or FEDMASK_TASK)")
    task = load_task_file(args.task, args.fleet)
    store = Store(args.db)
    store.upgrade()
    service = AggregatorService(
        broker_from_args(args),
        args.fleet,
        task,
        store,
        protocol=args.mqtt_protocol,
        client_id=args.client_id,
        shared_group=args.shared_group,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    logging.getLogger(__name__).info("aggregator serving fleet %s, task %s", args.fleet, task.task_id)
    try:
        while not stop.is_set() and not service.wait(1.0):
            pass
    finally:
        service.stop()
        store.close()
    outcome = service.manager.outcome
    if outcome is not None and outcome != "complete":
        raise SystemExit(f"fedmask aggregator run: task {task.task_id}: {outcome}")
    return 0
