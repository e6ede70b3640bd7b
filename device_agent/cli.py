"""The device agent's subcommands: ``fedmask agent run`` and ``fedmask predict``.

Each subcommand has an ``_add_<name>`` function that declares its options and points ``handler`` at
a function importing the real work lazily, so ``fedmask --help`` stays fast and an inference-only
install never needs torch.
"""

from __future__ import annotations

import argparse

from fedmask.config import ConfigError, RunError, add_option


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the device agent's subcommands to the ``fedmask`` command."""
    for add in _SUBCOMMANDS:
        add(subparsers)


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify samples with a .tflite model",
        description="Run a .tflite model (by default the device's own, kept by its agent) on the "
        "samples in a .npy/.npz file and print the predicted classes with names and confidence (and "
        "the accuracy when the file has labels).",
    )
    add_option(
        parser,
        "--model",
        metavar="FILE",
        help="the .tflite model (default: the device's own, from --state-dir)",
    )
    add_option(
        parser,
        "--state-dir",
        default=".fedmask-agent",
        help="the agent's state directory, where it keeps its finalized models",
    )
    add_option(
        parser, "--device-id", metavar="ID", help="whose model in --state-dir (needed if it holds several)"
    )
    add_option(parser, "--task", metavar="TASK_ID", help="the model of this task (default: the newest)")
    parser.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help=".npy samples, .npz with 'x' (and 'y'), or a device data file (uses x_test/y_test)",
    )
    parser.add_argument("--output", metavar="FILE", help="also write predictions: .json, .csv, .npy or .npz")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="table rows to print, 0 for all")
    add_option(parser, "--num-threads", type=int, default=1, metavar="N", help="interpreter threads")
    add_option(parser, "--batch-size", type=int, default=256, metavar="N", help="samples per invocation")
    parser.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from fedmask.device_agent.predict import run

    return run(args)


def _add_agent(subparsers: argparse._SubParsersAction) -> None:
    from fedmask.protocol.cli_options import add_broker_options

    agent = subparsers.add_parser("agent", help="the on-device agent")
    commands = agent.add_subparsers(dest="agent_command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="join a fleet: train when rounds open, finalize on command",
        description="Connect to the broker as DEVICE-ID, join the fleet's retained task (refusing it if "
        "the derived weight digest differs), train each round, and build the personalized TFLite model.",
    )
    add_broker_options(run)
    add_option(run, "--fleet", default="default", help="fleet name")
    add_option(run, "--device-id", metavar="ID", help="this device's id (also its MQTT username)")
    add_option(run, "--data", metavar="PATH", help="device data file (.npz from `fedmask data partition`)")
    add_option(run, "--state-dir", default=".fedmask-agent", help="where the agent keeps its state file")
    add_option(run, "--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_option(
        run,
        "--device-class",
        metavar="NAME",
        help="this device's class (e.g. pi_zero, jetson): a task may give each class its own model "
        "budget (FedMask: unit_keep_by_class)",
    )
    add_option(
        run,
        "--serve",
        action="store_true",
        default=False,
        help="stay up after a task and take the next one the fleet's aggregator publishes (a service; "
        "SIGTERM stops it cleanly)",
    )
    run.add_argument(
        "--once",
        dest="serve",
        action="store_false",
        default=None,
        help="one task, then exit (the default; overrides `serve: true` in a config file)",
    )
    run.set_defaults(handler=_run_agent)


def _run_agent(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    log = logging.getLogger(__name__)
    for flag, value, key in (("--device-id", args.device_id, "device_id"), ("--data", args.data, "data")):
        if not value:
            raise ConfigError(
                f"agent run: {flag} is required; pass {flag} "
                f"(or FEDMASK_{key.upper()}, or {key}: in --config)"
            )
    try:
        import torch
    except ImportError as exc:  # the agent trains with PyTorch: without it, it could only hang
        raise RunError(
            f"agent run: PyTorch is not installed ({exc}); the agent trains with it: install the "
            "CPU build of torch for this platform, then `pip install fedmask[train]`"
        ) from None
    from fedmask.datasets.federated import load_device
    from fedmask.device_agent.agent import DeviceAgent
    from fedmask.protocol.cli_options import brokers_from_args

    brokers = brokers_from_args(args)
    broker = brokers[0]  # the nodes of one cluster share credentials
    if broker.username and broker.username != args.device_id:
        # The project's ACL pins a device to the topics of its own username: the broker would refuse
        # every publish (presence, updates) of this agent, and it would wait forever for nothing.
        raise ConfigError(
            f"agent run: the MQTT credentials are for user {broker.username!r} but --device-id is "
            f"{args.device_id!r}; a device's username is its id: use the credentials file "
            f"`fedmask broker add-device --device {args.device_id}` wrote, or --device-id {broker.username}"
        )
    data = load_device(args.data)
    if data.device_id != args.device_id:
        raise ConfigError(
            f"agent run: --device-id {args.device_id} but {args.data} holds the data of device "
            f"{data.device_id!r}; pass --device-id {data.device_id} or that device's data file"
        )
    if args.device_class:
        data.meta = {**data.meta, "device_class": args.device_class}
    if args.threads:
        torch.set_num_threads(args.threads)
    agent = DeviceAgent(
        brokers,
        args.fleet,
        args.device_id,
        data,
        state_dir=args.state_dir,
        protocol=args.mqtt_protocol,
        serve=args.serve,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()  # a TransportError (no broker, refused login) becomes fedmask's one-line error
    try:
        if args.serve:
            # Until SIGTERM/SIGINT or a problem that concerns every task (agent.error).
            log.info("agent %s serving fleet %s", args.device_id, args.fleet)
            while not stop.wait(1.0) and agent.error is None:
                pass
        # Until the personalized model is sent, then until the aggregator confirmed it: the agent
        # republishes it meanwhile and gives up (agent.error) after its receipt attempts.
        while not stop.is_set() and not agent.finished.wait(1.0):
            pass
        while not stop.is_set() and not agent.result_confirmed.wait(1.0):
            pass
    finally:
        agent.stop()
    if agent.error is not None:
        raise RunError(f"agent run: {args.device_id}: {agent.error}")
    from fedmask.device_agent.inference import peak_rss_bytes

    log.info("agent %s done; peak RSS %.1f MiB", args.device_id, peak_rss_bytes() / 2**20)
    return 0


_SUBCOMMANDS = (_add_agent, _add_predict)
