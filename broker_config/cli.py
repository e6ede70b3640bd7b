"""`fedmask broker ...`: run mosquitto with the project's configuration, and manage broker accounts.

fedmask broker init DIR --host NAME [--ip ADDR]
fedmask broker add-device --passwd FILE --device ID [--out CREDENTIALS_FILE] [--password-stdin]
fedmask broker add-service-user --passwd FILE [--user aggregator|health] [--out CREDENTIALS_FILE]
fedmask broker run [--config dev|test|production|FILE] [--port N] [--passwd FILE] [--dry-run]
    [--bind ADDR] [--port-map OLD=NEW ...] [--config-dir DIR] [--data-dir DIR] [--log-dest stderr|FILE]
    [--user NAME]   (a one-machine trial of production.conf: loopback, free ports, your own paths)
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from fedmask.config import ConfigError, add_option

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "broker",
        help="run the MQTT broker with the project's config; add device accounts",
        description="Mosquitto configuration (dev, test, production with TLS and ACL) and broker accounts.",
    )
    actions = parser.add_subparsers(dest="broker_command", metavar="ACTION")
    parser.set_defaults(handler=lambda _args: _print_help(parser))

    init = actions.add_parser(
        "init",
        help="lay out a broker directory: CA and broker certificate, production.conf, the ACL",
        description="Write DIR/certs/ (a private CA and a broker certificate for --host and --ip, by the "
        "packaged make_ca.sh; an existing CA is reused), DIR/production.conf and DIR/fedmask.acl: the "
        "layout production.conf expects in /etc/mosquitto. Keep DIR/certs/ca.key offline afterwards.",
    )
    init.add_argument("directory", metavar="DIR", help="e.g. /etc/mosquitto, or a trial's own folder")
    init.add_argument("--host", required=True, metavar="NAME", help="DNS name devices dial (certificate)")
    init.add_argument("--ip", metavar="ADDR", help="also an IP address devices dial (certificate)")
    init.set_defaults(handler=_init)

    device = actions.add_parser(
        "add-device",
        help="add or update a device account and write its credentials file",
        description="Add DEVICE to the mosquitto password file (created if missing) with a random "
        "password, and write DEVICE:PASSWORD to a mode-0600 credentials file for the agent's "
        "--credentials-file. A running broker rereads the password file on SIGHUP.",
    )
    _add_account_options(device)
    device.add_argument(
        "--device", required=True, metavar="ID", help="device id, which is also the MQTT username"
    )
    device.set_defaults(handler=_add_device)

    service = actions.add_parser(
        "add-service-user",
        help="add or update the aggregator (or health-probe) account",
        description="Like add-device, for the accounts with their own ACL rules.",
    )
    _add_account_options(service)
    service.add_argument(
        "--user", choices=["aggregator", "health"], default="aggregator", help="account (default: aggregator)"
    )
    service.set_defaults(handler=_add_service_user)

    run = actions.add_parser(
        "run",
        help="run mosquitto in the foreground with one of the project's configs",
        description="Run mosquitto in the foreground. dev: loopback, anonymous (development only). "
        "test: the test template with --passwd and the project ACL. production: TLS, password "
        "file and ACL at the paths in production.conf. FILE: any mosquitto config.",
    )
    add_option(
        run,
        "--config",
        dest="mosquitto_config",
        default="dev",
        metavar="dev|test|production|FILE",
        help="which mosquitto configuration",
    )
    add_option(
        run, "--port", dest="broker_port", type=int, metavar="N", help="move the first listener to port N"
    )
    add_option(run, "--passwd", metavar="FILE", help="password file for --config test")
    add_option(
        run,
        "--data-dir",
        metavar="DIR",
        help="generated configs (default runs/mosquitto), the persistence of --config test, and of any "
        "config when given",
    )
    add_option(run, "--bind", metavar="ADDR", help="bind every listener to this address, e.g. 127.0.0.1")
    run.add_argument(
        "--port-map",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="move the listener on port OLD to NEW (repeatable), e.g. 8883=18883",
    )
    add_option(
        run,
        "--config-dir",
        metavar="DIR",
        help="read the config's files (certificates, password files, ACL) under DIR instead of "
        "/etc/mosquitto, keeping their relative paths",
    )
    add_option(
        run, "--log-dest", metavar="stderr|FILE", help="where mosquitto logs (instead of the config's)"
    )
    add_option(run, "--user", metavar="NAME", help="user mosquitto switches to when started as root")
    run.add_argument(
        "--dry-run", action="store_true", help="print the effective config and command; do not run"
    )
    run.set_defaults(handler=_run)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _add_account_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--passwd", metavar="FILE", help="mosquitto password file to create or update")
    parser.add_argument(
        "--out", metavar="CREDENTIALS_FILE", help="where to write USER:PASSWORD (default: next to --passwd)"
    )
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of generating one",
    )


def _account_password(args: argparse.Namespace) -> str | None:
    if not args.password_stdin:
        return None
    return sys.stdin.readline().rstrip("\r\n")


def _require_passwd(args: argparse.Namespace) -> str:
    if not args.passwd:
        raise ConfigError("--passwd FILE is required (or FEDMASK_PASSWD / `passwd:` in the config file)")
    return args.passwd


def _add_device(args: argparse.Namespace) -> int:
    from fedmask.broker_config.credentials import CredentialsError, add_device, default_credentials_path

    passwd = _require_passwd(args)
    try:
        add_device(passwd, args.device, _account_password(args), credentials_file=args.out)
    except CredentialsError as exc:
        raise ConfigError(str(exc)) from exc
    out = args.out or default_credentials_path(passwd, args.device)
    print(f"{args.device}: account in {passwd}, credentials in {out} (mode 0600)")
    print("a running mosquitto picks the account up after SIGHUP (systemctl reload mosquitto)")
    return 0


def _add_service_user(args: argparse.Namespace) -> int:
    from fedmask.broker_config.credentials import CredentialsError, add_service_user, default_credentials_path

    passwd = _require_passwd(args)
    try:
        add_service_user(passwd, args.user, _account_password(args), credentials_file=args.out)
    except CredentialsError as exc:
        raise ConfigError(str(exc)) from exc
    out = args.out or default_credentials_path(passwd, args.user)
    print(f"{args.user}: account in {passwd}, credentials in {out} (mode 0600)")
    return 0


def _init(args: argparse.Namespace) -> int:
    import shutil
    import subprocess
    from pathlib import Path

    from fedmask.broker_config.configs import ACL_FILE, NAMED_CONFIGS, PACKAGE_DIR
    from fedmask.config import RunError

    if shutil.which("openssl") is None:
        raise RunError("broker init: openssl is not installed; install it (apt-get install openssl)")
    folder = Path(args.directory)
    certs = folder / "certs"
    command = ["sh", str(PACKAGE_DIR / "make_ca.sh"), str(certs), args.host, *([args.ip] if args.ip else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RunError(f"broker init: make_ca.sh failed: {done.stderr.strip().splitlines()[-1:]}")
    shutil.copyfile(ACL_FILE, folder / "fedmask.acl")
    shutil.copyfile(NAMED_CONFIGS["production"], folder / "production.conf")
    print(f"{folder}: certs/ (CA and broker certificate for {args.host}), production.conf, fedmask.acl")
    print(f"devices need {certs / 'ca.crt'} only; keep {certs / 'ca.key'} offline")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedmask.broker_config.binaries import BrokerUnavailableError
    from fedmask.broker_config.runner import Overrides, prepare_launch, run_foreground

    try:
        launch = prepare_launch(
            args.mosquitto_config,
            port=args.broker_port,
            passwd=args.passwd,
            data_dir=args.data_dir,
            overrides=Overrides(
                ports=_port_map(args.port_map),
                bind=args.bind,
                config_dir=Path(args.config_dir) if args.config_dir else None,
                log_dest=args.log_dest,
                user=args.user,
            ),
        )
        if args.dry_run:
            print(f"# command: {' '.join(launch.command)}")
            print(launch.config_text, end="")
            return 0
        return run_foreground(launch)
    except BrokerUnavailableError as exc:  # mosquitto missing: not a usage error
        logger.error("%s", exc)
        return 1
    except ValueError as exc:  # ConfigFileError, bad port: the user's input
        raise ConfigError(str(exc)) from exc


def _port_map(pairs: list[str]) -> dict[int, int]:
    """``["8883=18883"]`` -> ``{8883: 18883}``; anything else is a ``ConfigError``."""
    ports: dict[int, int] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip().isdigit() or not new.strip().isdigit():
            raise ConfigError(f"--port-map {pair!r}: expected OLD=NEW with two port numbers, e.g. 8883=18883")
        ports[int(old)] = int(new)
    return ports
