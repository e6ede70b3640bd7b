"""The one `fedmask` command. Each component registers its own subcommands from a light `cli` module
(no heavy imports at module level, so `fedmask --help` and an inference-only install stay fast)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fedmask import __version__
from fedmask.config import ConfigError, resolve

# Components that contribute subcommands, in the order `--help` lists them.
COMPONENTS = (
    "fedmask.simulator.cli",
    "fedmask.datasets.cli",
    "fedmask.aggregator.cli",
    "fedmask.device_agent.cli",
    "fedmask.storage.cli",
    "fedmask.broker_config.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmask",
        description="Personalized federated learning with binary masks, for IoT fleets over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"fedmask {__version__}")
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON config file (also FEDMASK_CONFIG)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMPONENTS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.register(sub)
    _accept_config_everywhere(sub)
    return parser


def _accept_config_everywhere(sub: argparse._SubParsersAction) -> None:
    """Let `--config FILE` also follow the subcommand (`fedmask simulate --config run.yaml`)."""
    for parser in set(sub.choices.values()):
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for action in nested:
                _accept_config_everywhere(action)
        elif "--config" not in parser._option_string_actions:
            parser.add_argument(
                "--config", default=argparse.SUPPRESS, metavar="FILE", help="YAML/JSON config file"
            )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Alembic announces every plugin it loads at INFO; only its warnings matter to a user.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        resolve(args, command=args.command)
        result = args.handler(args)
    except ConfigError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
