"""Fleet scale on real Mosquittos: several broker URLs with failover, agents across OS processes, and
failures that are fast and say why."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from fedmask.broker_config.embedded import EmbeddedBroker
from fedmask.config import resolve
from fedmask.datasets.federated import DeviceData
from fedmask.device_agent.agent import DeviceAgent
from fedmask.protocol.broker_url import BrokerUrlError
from fedmask.protocol.topics import Topics
from fedmask.protocol.transport import MqttConnection, ReceivedMessage, TransportError
from fedmask.simulator.agent_processes import AgentProcesses, AgentStartError, default_processes

pytestmark = pytest.mark.broker

TOPICS = Topics("fleet-scale")


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    return f"mqtt://127.0.0.1:{port}"


def device(index: int) -> DeviceData:
    rng = np.random.default_rng(index)
    x = rng.normal(size=(8, 3, 128)).astype(np.float32)
    return DeviceData(f"dev-{index}", x[:6], np.arange(6) % 14, x[6:], np.arange(2) % 14, num_classes=14)


def test_connection_fails_over_to_the_next_broker_with_its_own_session(tmp_path: Path) -> None:
    with (
        EmbeddedBroker(workdir=tmp_path / "a", backend="mosquitto") as a,
        EmbeddedBroker(workdir=tmp_path / "b", backend="mosquitto") as b,
    ):
        received: list[bytes] = []
        sub = MqttConnection([a.url, b.url], "agg", reconnect_min_delay_s=1, reconnect_max_delay_s=2)
        sub.subscribe(TOPICS.all_up, lambda m: received.append(m.payload))
        sub.connect()
        assert (sub.broker.port, sub.session_id) == (a.port, "agg")
        a.kill()
        deadline = time.monotonic() + 15
        while not (sub.connected and sub.broker.port == b.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sub.broker.port == b.port and sub.session_id == "agg.1"
        with MqttConnection(b.url, "dev-1") as pub:
            pub.connect()
            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:  # re-subscription may be in flight
                pub.publish(TOPICS.up("dev-1"), b"via b")
                time.sleep(0.2)
        assert b"via b" in received
        sub.close()


def test_first_connection_tries_every_url_and_names_them_all() -> None:
    first, second = dead_url(), dead_url()
    connection = MqttConnection(f"{first},{second}".split(","), "lonely")
    with pytest.raises(TransportError, match=f"cannot connect to {first}, {second}:"):
        connection.connect(timeout_s=1.0)


def test_urls_of_one_connection_must_share_tls_and_credentials() -> None:
    with pytest.raises(ValueError, match="differ in TLS or credentials"):
        MqttConnection(["mqtt://a:1883", "mqtts://b:8883"], "x")


def test_broker_option_takes_comma_separated_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from fedmask.protocol.cli_options import add_broker_options, brokers_from_args

    parser = argparse.ArgumentParser()
    add_broker_options(parser)
    monkeypatch.setenv("FEDMASK_BROKER", "mqtt://n1:1883, mqtt://n2:1884")
    args = resolve(parser.parse_args([]))
    assert [(b.host, b.port) for b in brokers_from_args(args)] == [("n1", 1883), ("n2", 1884)]
    args = resolve(parser.parse_args(["--broker", "mqtt://n1:1883,"]))
    with pytest.raises(BrokerUrlError, match="empty URL"):
        brokers_from_args(args)
    args = resolve(parser.parse_args(["--broker", "mqtt://n1,mqtts://n2"]))
    with pytest.raises(BrokerUrlError, match="differ in scheme or credentials"):
        brokers_from_args(args)


def test_an_agent_that_never_connected_stops_at_once(tmp_path: Path) -> None:
    agent = DeviceAgent(dead_url(), "fleet-scale", "dev-0", device(0), state_dir=tmp_path)
    with pytest.raises(TransportError, match="cannot connect"):
        agent.connection.connect(timeout_s=0.5)
    started = time.monotonic()
    agent.stop()
    assert time.monotonic() - started < 1.0  # it used to wait 5 s for the PUBACK of its offline presence


def test_agent_processes_fail_fast_with_the_reason(tmp_path: Path) -> None:
    url = dead_url()
    fleet = AgentProcesses(url, "fleet-scale", [device(i) for i in range(6)], state_dir=tmp_path, processes=2)
    started = time.monotonic()
    with pytest.raises(AgentStartError, match=f"agent dev-[01]: cannot connect to {url}"):
        fleet.start()
    assert time.monotonic() - started < 60  # two interpreters starting, one 10 s connect timeout each
    assert not fleet.started and fleet._workers == []


def test_agent_processes_hold_at_most_100_agents_each() -> None:
    assert [default_processes(n) for n in (1, 100, 101, 250, 1000)] == [1, 1, 2, 3, 10]


def test_agents_in_processes_publish_their_presence(tmp_path: Path) -> None:
    with EmbeddedBroker(workdir=tmp_path / "broker", backend="mosquitto") as broker:
        seen: set[str] = set()

        def presence(message: ReceivedMessage) -> None:
            seen.add(message.topic.rsplit("/", 1)[-1])

        with MqttConnection(broker.url, "watcher") as watcher:
            watcher.subscribe(TOPICS.all_state, presence)
            watcher.connect()
            fleet = AgentProcesses(
                broker.url, "fleet-scale", [device(i) for i in range(5)], state_dir=tmp_path, processes=2
            ).start()
            deadline = time.monotonic() + 10
            while len(seen) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            reports = fleet.stop()
        assert seen == {f"dev-{i}" for i in range(5)}
        assert sorted(r.device_id for r in reports) == [f"dev-{i}" for i in range(5)]
        assert all(r.error is None and r.bytes_sent == 0 for r in reports)  # no task: nothing trained
