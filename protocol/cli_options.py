"""The broker options every MQTT subcommand shares, so the aggregator and the agent spell them alike.

Light on purpose (no paho, numpy or msgpack at import): ``fedmask --help`` imports every cli module.
Each option also comes from ``FEDMASK_<OPTION>`` or the config file (``fedmask.config``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fedmask.config import add_option

if TYPE_CHECKING:
    from fedmask.protocol.broker_url import BrokerUrl

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
# Mirrors chunking.DEFAULT_MAX_PAYLOAD (checked by tests) without importing it here.
DEFAULT_MAX_PAYLOAD = 128 * 1024


def add_broker_options(parser: argparse.ArgumentParser) -> None:
    """Add --broker, --mqtt-protocol, --ca-file, --credentials-file and --max-payload."""
    add_option(
        parser,
        "--broker",
        default=DEFAULT_BROKER,
        metavar="URL",
        help="broker URL: mqtt://[user[:password]@]host[:port] or mqtts://... (TLS, port 8883)",
    )
    add_option(
        parser, "--mqtt-protocol", default="5", choices=["5", "3.1.1"], help="MQTT protocol version to speak"
    )
    add_option(
        parser, "--ca-file", metavar="PEM", help="CA bundle that signed an mqtts:// broker's certificate"
    )
    add_option(
        parser,
        "--credentials-file",
        metavar="FILE",
        help="file holding 'username:password' or JSON {username, password} "
        "(else FEDMASK_MQTT_USERNAME / FEDMASK_MQTT_PASSWORD)",
    )
    add_option(
        parser,
        "--max-payload",
        type=int,
        default=DEFAULT_MAX_PAYLOAD,
        metavar="BYTES",
        help="largest MQTT payload to publish; bigger messages are chunked",
    )


def broker_from_args(args: argparse.Namespace) -> BrokerUrl:
    """The broker URL and credentials the resolved options describe (call after ``config.resolve``)."""
    from fedmask.protocol.broker_url import parse_broker_url

    return parse_broker_url(args.broker, ca_file=args.ca_file, credentials_file=args.credentials_file)
