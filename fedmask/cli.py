"""The one `fedmask` command. Each component registers its own subcommands from a light `cli` module
(no heavy imports at module level, so `fedmask --help` and an inference-only install stay fast).

Errors end in one line on stderr, ``fedmask: error: <cause>; <what to do>``, and an exit code: 2 for
usage and configuration mistakes (bad flags, config keys or values, unknown names, a missing config or
task file), 1 for failures while running (broker unreachable, database down, TLS, a refused publish,
missing data). The traceback is printed only with ``--log-level DEBUG``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from fedmask import __version__
from fedmask.config import LOG_LEVELS, ConfigError, RunError, add_option, config_schema, resolve

# Components that contribute subcommands, in the order `--help` lists them.
COMPONENTS = (
    "fedmask.simulator.cli",
    "fedmask.datasets.cli",
    "fedmask.aggregator.cli",
    "fedmask.device_agent.cli",
    "fedmask.storage.cli",
    "fedmask.broker_config.cli",
)

USAGE_EXIT, RUNTIME_EXIT = 2, 1


class CommandParser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line ``fedmask: error: ...; see --help`` form (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_EXIT, f"fedmask: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="fedmask",
        description="Personalized federated learning with binary masks, for IoT fleets over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"fedmask {__version__}")
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON config file (also FEDMASK_CONFIG)")
    add_option(
        parser,
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="logging level, before or after the subcommand (DEBUG also prints tracebacks)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMPONENTS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.register(sub)
    _accept_global_options_everywhere(sub)
    parser.set_defaults(_config_schema=config_schema(parser))
    return parser


def _accept_global_options_everywhere(sub: argparse._SubParsersAction) -> None:
    """Let `--config FILE` and `--log-level` also follow the subcommand (`fedmask simulate --config x`)."""
    for parser in set(sub.choices.values()):
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for action in nested:
                _accept_global_options_everywhere(action)
            continue
        if "--config" not in parser._option_string_actions:
            parser.add_argument(
                "--config", default=argparse.SUPPRESS, metavar="FILE", help="YAML/JSON config file"
            )
        if "--log-level" not in parser._option_string_actions:
            parser.add_argument(
                "--log-level",
                default=argparse.SUPPRESS,
                type=str.upper,
                choices=LOG_LEVELS,
                help="logging level (also before the subcommand)",
            )


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Alembic announces every plugin it loads at INFO; only its warnings matter to a user.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))


def _fail(code: int, message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc(file=sys.stderr)
    print(f"fedmask: error: {message}", file=sys.stderr)
    sys.stderr.flush()
    return code


def _with_hint(message: str, args: argparse.Namespace) -> str:
    """A usage error's fix: the message's own when it has one, else where the options are described."""
    if "; " in message:
        return message
    words = [args.command] + [
        str(v) for k, v in sorted(vars(args).items()) if k.endswith("_command") and isinstance(v, str)
    ]
    return f"{message}; see `fedmask {' '.join(w for w in words if w)} --help`"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return USAGE_EXIT
    debug = getattr(args, "log_level", None) == "DEBUG"
    try:
        resolve(args, command=args.command)
        if str(args.log_level).upper() not in LOG_LEVELS:
            raise ConfigError(f"log level {args.log_level!r}; expected one of {', '.join(LOG_LEVELS)}")
        args.log_level = str(args.log_level).upper()
        debug = args.log_level == "DEBUG"
    except ConfigError as exc:
        raise SystemExit(_fail(USAGE_EXIT, _with_hint(str(exc), args), debug)) from None
    _setup_logging(args.log_level)
    try:
        result = args.handler(args)
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise
    except BaseException as exc:
        code, message = explain(exc)
        if code == USAGE_EXIT:
            message = _with_hint(message, args)
            raise SystemExit(_fail(code, message, debug)) from None
        return _fail(code, message, debug)
    return int(result or 0)


# -- turning exceptions into a cause and a fix ------------------------------------------------------------

DEBUG_HINT = "run with --log-level DEBUG for the traceback"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def _is(exc: BaseException, module: str, name: str) -> bool:
    return any(c.__module__.startswith(module) and c.__name__ == name for c in type(exc).__mro__)


def explain(exc: BaseException) -> tuple[int, str]:
    """Exit code and ``cause; fix`` line for an exception that ended a command."""
    import ssl

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ConfigError):
        return USAGE_EXIT, text
    if isinstance(exc, RunError):
        return RUNTIME_EXIT, text
    chain = _chain(exc)
    if _is(exc, "fedmask.protocol.broker_url", "BrokerUrlError"):
        return USAGE_EXIT, f"{text}; fix --broker, --ca-file or --credentials-file (or FEDMASK_BROKER ...)"
    if _is(exc, "fedmask.protocol.transport", "TransportError"):
        if any(isinstance(c, ssl.SSLCertVerificationError) for c in chain):
            return RUNTIME_EXIT, (
                f"{text}; the broker's TLS certificate was not verified: pass the CA that signed it with "
                "--ca-file, and connect to the host name the certificate was issued for"
            )
        if any(isinstance(c, ssl.SSLError) for c in chain):
            return RUNTIME_EXIT, f"{text}; check that the port speaks TLS (mqtts://) and --ca-file"
        if "--mqtt-protocol 3.1.1" in text:
            return RUNTIME_EXIT, text  # names its fix (a broker that speaks only MQTT 3.1.1)
        if "cannot connect" in text or "no CONNACK" in text:
            return RUNTIME_EXIT, (
                f"{text}; is the broker running and reachable there? start it (`fedmask broker run`) "
                "or fix --broker / FEDMASK_BROKER"
            )
        if "refused publish" in text or "publish to" in text:
            return RUNTIME_EXIT, (
                f"{text}; the broker's ACL does not let this user publish there: check --fleet, the "
                "credentials (--credentials-file) and the account's ACL entry"
            )
        if "refused" in text:
            return RUNTIME_EXIT, (
                f"{text}; check the username and password (--credentials-file or "
                "FEDMASK_MQTT_USERNAME / FEDMASK_MQTT_PASSWORD)"
            )
        return RUNTIME_EXIT, f"{text}; check the broker and --broker ({DEBUG_HINT})"
    if _is(exc, "sqlalchemy", "ArgumentError") or _is(exc, "sqlalchemy", "NoSuchModuleError"):
        return USAGE_EXIT, (
            f"database URL: {text}; expected e.g. sqlite:///fedmask.db or postgresql://user@host/db (--db)"
        )
    if _is(exc, "sqlalchemy", "OperationalError") or _is(exc, "sqlalchemy", "InterfaceError"):
        orig = getattr(exc, "orig", None)
        cause = " ".join(str(orig if orig is not None else exc).split())
        return RUNTIME_EXIT, (
            f"database: {cause}; check --db (or FEDMASK_DB) and that the database server is running "
            "and accepts this user"
        )
    if _is(exc, "fedmask.storage", "StorageError"):
        return RUNTIME_EXIT, text
    if _is(exc, "fedmask.datasets.errors", "DatasetError") or isinstance(exc, FileNotFoundError):
        if isinstance(exc, FileNotFoundError) and exc.filename:
            text = f"{exc.strerror or 'no such file'}: {exc.filename}"
        return RUNTIME_EXIT, (
            f"{text}; check the path (--data, --data-root or the config file); "
            "`fedmask data partition` writes device files"
        )
    if isinstance(exc, PermissionError):
        return RUNTIME_EXIT, f"{text}; check the file's permissions"
    if isinstance(exc, MemoryError):
        return RUNTIME_EXIT, "out of memory; use fewer devices, a smaller model or fewer threads"
    return RUNTIME_EXIT, f"{type(exc).__name__}: {text}; {DEBUG_HINT}"


if __name__ == "__main__":
    sys.exit(main())
