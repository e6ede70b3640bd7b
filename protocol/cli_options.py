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
        help="broker URL: mqtt://[user[:password]@]host[:port] or mqtts://... (TLS, port 8883); "
        "several, comma-separated, for the nodes of a broker cluster (failover to the next)",
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
    """The (first) broker URL and credentials the resolved options describe (after ``config.resolve``)."""
    return brokers_from_args(args)[0]


def brokers_from_args(args: argparse.Namespace) -> list[BrokerUrl]:
    """Every broker URL of ``--broker`` (comma-separated: the nodes of one cluster), in order."""
    from fedmask.protocol.broker_url import BrokerUrlError, parse_broker_url

    urls = [url.strip() for url in str(args.broker).split(",")]
    if not all(urls):
        raise BrokerUrlError(f"--broker {args.broker!r}: an empty URL between commas")
    brokers = [
        parse_broker_url(url, ca_file=args.ca_file, credentials_file=args.credentials_file) for url in urls
    ]
    if len({(b.tls, b.username, b.password) for b in brokers}) > 1:
        raise BrokerUrlError(
            "--broker: the URLs differ in scheme or credentials; the nodes of one cluster share both"
        )
    return brokers
