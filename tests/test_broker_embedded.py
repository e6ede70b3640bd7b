"""EmbeddedBroker: lifecycle, persistence across restarts, size limits, and the amqtt fallback."""

from __future__ import annotations

import socket
from urllib.parse import unquote, urlsplit

import pytest
from fixtures.broker import AGGREGATOR, MQTT_V5, MQTT_V311, BrokerHandle

from fedmask.broker_config.binaries import BrokerUnavailableError, find_mosquitto
from fedmask.broker_config.credentials import Credentials
from fedmask.broker_config.embedded import BrokerStartError, EmbeddedBroker

pytestmark = pytest.mark.broker

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
DOWN = "fedmask/v1/fleet-a/down/dev-1"
# Above mosquitto's default max_queued_messages (1000), which would silently drop the rest.
QUEUED = 1500


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("protocol", [MQTT_V5, MQTT_V311])
def test_restart_keeps_port_and_every_queued_qos1_message(mosquitto, mqtt_probe, protocol):
    session = {"client_id": f"dev-1-session-{protocol}", "protocol": protocol, "clean": False}
    if protocol == MQTT_V5:
        session["session_expiry"] = 3600  # MQTT 5 sessions end at disconnect unless told otherwise
    device = mqtt_probe(mosquitto, "dev-1", **session)
    device.subscribe(DOWN)
    device.close()

    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    for n in range(QUEUED):
        aggregator.publish(DOWN, n.to_bytes(2, "big"))
    aggregator.close()

    port = mosquitto.port
    mosquitto.restart()
    assert mosquitto.port == port

    device = mqtt_probe(mosquitto, "dev-1", **session)
    received = device.wait_for_count(QUEUED, timeout=20)
    assert [int.from_bytes(m.payload, "big") for m in received] == list(range(QUEUED))
    assert all(m.qos == 1 for m in received)


def test_retained_task_survives_restart(mosquitto, mqtt_probe):
    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    aggregator.publish("fedmask/v1/fleet-a/task", b"spec v1", retain=True)
    aggregator.close()
    mosquitto.restart()
    device = mqtt_probe(mosquitto, "dev-2")
    device.subscribe("fedmask/v1/fleet-a/task")
    message = device.wait_for("fedmask/v1/fleet-a/task")
    assert message.retain and message.payload == b"spec v1"


def test_kill_then_start_comes_back_on_the_same_port(open_mosquitto, mqtt_probe):
    port = open_mosquitto.port
    open_mosquitto.kill()
    assert not open_mosquitto.broker.running
    assert not listening(port)
    open_mosquitto.start()
    probe = mqtt_probe(open_mosquitto)
    assert probe.port == port and not probe.connack.is_failure


LIMIT = 256 * 1024  # the largest payload the protocol's chunker publishes
PACKET_LIMIT = 266240  # max_packet_size of every packaged config: LIMIT and 4 KiB of topic/properties


def test_payload_of_exactly_256_kib_is_delivered(open_mosquitto, mqtt_probe):
    receiver = mqtt_probe(open_mosquitto)
    receiver.subscribe("size/#")
    sender = mqtt_probe(open_mosquitto)
    long_topic = "size/" + "t" * 200  # a long fleet and device name still fit the headroom
    assert not sender.publish(long_topic, bytes(LIMIT)).is_failure
    assert len(receiver.wait_for(long_topic).payload) == LIMIT


@pytest.mark.parametrize("protocol", [MQTT_V311, MQTT_V5])
def test_a_packet_over_max_packet_size_is_refused_and_never_delivered(open_mosquitto, mqtt_probe, protocol):
    """Past max_packet_size the broker drops the client (MQTT 5 clients are told the limit first;
    paho 2.2 sends anyway). The chunker's job is to never get there."""
    receiver = mqtt_probe(open_mosquitto)
    receiver.subscribe("size/#")
    sender = mqtt_probe(open_mosquitto, protocol=protocol)
    try:
        refused = sender.publish("size/over", bytes(PACKET_LIMIT)).is_failure
    except (ConnectionError, RuntimeError):  # dropped before its PUBACK, or refused by paho itself
        refused = True
    sender.close()  # stop paho from resending the oversized message
    assert refused
    # The broker has dealt with the oversized message; a later one reaches the receiver after it.
    mqtt_probe(open_mosquitto).publish("size/after", b"sentinel")
    receiver.wait_for("size/after")
    assert "size/over" not in receiver.topics()


@needs_mosquitto
def test_context_manager_stops_and_removes_its_temp_dir():
    with EmbeddedBroker() as broker:
        workdir, port = broker.workdir, broker.port
        assert broker.backend == "mosquitto" and broker.protocol_versions == (MQTT_V311, MQTT_V5)
        assert broker.persistent and listening(port)
    assert not workdir.exists()
    assert not listening(port)


@needs_mosquitto
def test_url_for_escapes_credentials_that_the_broker_then_accepts(tmp_path, mqtt_probe):
    password = "p@ss:/w rd"
    with EmbeddedBroker(auth=True, users={"dev-1": password}, workdir=tmp_path) as broker:
        url = urlsplit(broker.url_for("dev-1"))
        assert (url.scheme, url.hostname, url.port) == ("mqtt", "127.0.0.1", broker.port)
        creds = Credentials(unquote(url.username), unquote(url.password))
        assert creds == Credentials("dev-1", password)
        assert not mqtt_probe(BrokerHandle(broker), credentials=creds).connack.is_failure


@needs_mosquitto
def test_start_failure_reports_the_broker_log(tmp_path):
    broker = EmbeddedBroker(
        auth=True, users={"dev-1": "x"}, acl_file=tmp_path / "missing.acl", workdir=tmp_path
    )
    with pytest.raises(BrokerStartError, match=r"exited with code \d+") as info:
        broker.start()
    assert "missing.acl" in str(info.value)  # the log tail names the file mosquitto could not open
    broker.close()


def test_users_without_auth_are_refused():
    with pytest.raises(ValueError, match="auth=False"):
        EmbeddedBroker(users={"dev-1": "x"})


def test_amqtt_fallback_cannot_enforce_auth():
    with pytest.raises(BrokerUnavailableError, match="amqtt fallback is anonymous only"):
        EmbeddedBroker(auth=True, users={"dev-1": "x"}, backend="amqtt")


def test_amqtt_fallback_serves_mqtt311_and_refuses_mqtt5(mqtt_probe):
    with EmbeddedBroker(backend="amqtt") as broker:
        assert broker.backend == "amqtt"
        assert broker.protocol_versions == (MQTT_V311,)
        assert not broker.persistent
        handle = BrokerHandle(broker)

        subscriber = mqtt_probe(handle, protocol=MQTT_V311)
        subscriber.subscribe("fedmask/v1/fleet-a/round/#")
        publisher = mqtt_probe(handle, protocol=MQTT_V311)
        assert not publisher.publish("fedmask/v1/fleet-a/round/1/chunk/0", b"chunk").is_failure
        assert subscriber.wait_for("fedmask/v1/fleet-a/round/1/chunk/0").payload == b"chunk"

        modern = mqtt_probe(handle, protocol=MQTT_V5, expect_refusal=True)
        assert modern.connack.is_failure  # "Unsupported protocol version"
        port = broker.port
    assert not listening(port)
