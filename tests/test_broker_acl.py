"""Authentication and the topic ACL, against a real mosquitto started from test.conf.template with
the project's fedmask.acl (fixture `mosquitto`), using paho-mqtt 2.x clients.

Refused publishes are checked in two ways: the MQTT 5 PUBACK reason code, and, since MQTT 3.1.1
has no negative PUBACK, by a sentinel: the same client then publishes an allowed message to the
same watcher. Mosquitto delivers one publisher's QoS 1 messages in order, so once the sentinel
has arrived, a refused message that had been let through would already be there.
"""

from __future__ import annotations

import pytest
from fixtures.broker import AGGREGATOR, MQTT_V5, MQTT_V311, wait_until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from fedmask.broker_config.credentials import Credentials

pytestmark = pytest.mark.broker

FLEET = "fleet-a"
NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86
DISCONNECT_WITH_WILL = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")


def accepted(ack: ReasonCode) -> bool:
    """PUBACK below 0x80 is success (0x10 "No matching subscribers" included)."""
    return not ack.is_failure


def topic(kind: str, device: str | None = None) -> str:
    return f"fedmask/v1/{FLEET}/{kind}" + (f"/{device}" if device else "")


# --- authentication ------------------------------------------------------------------------------


def test_anonymous_mqtt5_client_is_refused(mosquitto, mqtt_probe):
    probe = mqtt_probe(mosquitto, expect_refusal=True)
    assert probe.connack.value == NOT_AUTHORIZED


def test_anonymous_mqtt311_client_is_refused(mosquitto, mqtt_probe):
    probe = mqtt_probe(mosquitto, protocol=MQTT_V311, expect_refusal=True)
    assert probe.connack.is_failure
    assert probe.connack.getName() == "Not authorized"  # CONNACK return code 5 in MQTT 3.1.1


@pytest.mark.parametrize("protocol", [MQTT_V5, MQTT_V311])
def test_wrong_password_is_refused(mosquitto, mqtt_probe, protocol):
    wrong = Credentials("dev-1", mosquitto.credentials("dev-1").password + "x")
    probe = mqtt_probe(mosquitto, credentials=wrong, protocol=protocol, expect_refusal=True)
    assert probe.connack.is_failure
    if protocol == MQTT_V5:
        # mosquitto 2.0.11 answers a bad password with 0x86 "Bad user name or password" or 0x87.
        assert probe.connack.value in (BAD_CREDENTIALS, NOT_AUTHORIZED)


def test_unknown_user_is_refused(mosquitto, mqtt_probe):
    probe = mqtt_probe(mosquitto, credentials=Credentials("dev-99", "pw-dev-99"), expect_refusal=True)
    assert probe.connack.is_failure


def test_every_test_account_can_log_in(mosquitto, mqtt_probe):
    for user in ("aggregator", "dev-1", "dev-12"):
        assert not mqtt_probe(mosquitto, user).connack.is_failure


# --- what a device may write ---------------------------------------------------------------------


def test_device_publishing_on_another_devices_up_topic_is_refused_mqtt5(mosquitto, mqtt_probe):
    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    aggregator.subscribe(topic("up", "+"))
    intruder = mqtt_probe(mosquitto, "dev-2")

    refused = intruder.publish(topic("up", "dev-1"), b"forged update")
    assert refused.value == NOT_AUTHORIZED

    assert accepted(intruder.publish(topic("up", "dev-2"), b"sentinel"))
    aggregator.wait_for(topic("up", "dev-2"))
    assert topic("up", "dev-1") not in aggregator.topics()


def test_device_publishing_on_another_devices_up_topic_is_dropped_mqtt311(mosquitto, mqtt_probe):
    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    aggregator.subscribe(topic("up", "+"))
    intruder = mqtt_probe(mosquitto, "dev-2", protocol=MQTT_V311)

    ack = intruder.publish(topic("up", "dev-1"), b"forged update")
    assert not ack.is_failure  # 3.1.1 cannot say no: the broker acknowledges and drops it

    intruder.publish(topic("up", "dev-2"), b"sentinel")
    aggregator.wait_for(topic("up", "dev-2"))
    assert topic("up", "dev-1") not in aggregator.topics()


@pytest.mark.parametrize("protocol", [MQTT_V5, MQTT_V311])
def test_device_cannot_write_task_or_round(mosquitto, mqtt_probe, protocol):
    # The aggregator reads task, round and round/# (shared rules) and up/dev-3 (the sentinel).
    watcher = mqtt_probe(mosquitto, AGGREGATOR)
    watcher.subscribe(f"fedmask/v1/{FLEET}/#")
    device = mqtt_probe(mosquitto, "dev-3", protocol=protocol)
    forbidden = [topic("task"), topic("round"), f"{topic('round')}/7/chunk/0"]
    for name in forbidden:
        ack = device.publish(name, b"forged", retain=True)
        if protocol == MQTT_V5:
            assert ack.value == NOT_AUTHORIZED, name
    device.publish(topic("up", "dev-3"), b"sentinel")
    watcher.wait_for(topic("up", "dev-3"))
    assert set(watcher.topics()).isdisjoint(forbidden)


def test_device_cannot_write_down_topics(mosquitto, mqtt_probe):
    device = mqtt_probe(mosquitto, "dev-3")
    assert device.publish(topic("down", "dev-3"), b"forged").value == NOT_AUTHORIZED
    assert device.publish(topic("down", "dev-4"), b"forged").value == NOT_AUTHORIZED


def test_plus_in_acl_patterns_matches_exactly_one_topic_level(mosquitto, mqtt_probe):
    device = mqtt_probe(mosquitto, "dev-5")
    for fleet in ("fleet-a", "fleet-b", "x"):  # `+` stands for any one fleet name
        assert accepted(device.publish(f"fedmask/v1/{fleet}/up/dev-5", b"u")), fleet
    for name in ("fedmask/v1/up/dev-5", "fedmask/v1/a/b/up/dev-5", "fedmask/v1/fleet-a/up/dev-5/extra"):
        assert device.publish(name, b"u").value == NOT_AUTHORIZED, name


def test_device_publishes_its_own_up_and_state(mosquitto, mqtt_probe):
    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    aggregator.subscribe(topic("up", "+"))
    aggregator.subscribe(topic("state", "+"))
    device = mqtt_probe(mosquitto, "dev-4")
    assert accepted(device.publish(topic("up", "dev-4"), b"update"))
    assert accepted(device.publish(topic("state", "dev-4"), b"online", retain=True))
    assert aggregator.wait_for(topic("up", "dev-4")).payload == b"update"
    assert aggregator.wait_for(topic("state", "dev-4")).payload == b"online"


def test_last_will_lands_on_the_devices_own_state_topic_only(mosquitto, mqtt_probe):
    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    aggregator.subscribe(topic("state", "+"))
    # dev-6 registers a will on dev-5's presence topic: the broker accepts the connection but must
    # not publish that will.
    impostor = mqtt_probe(mosquitto, "dev-6", will=(topic("state", "dev-5"), b"offline"))
    impostor.client.disconnect(reasoncode=DISCONNECT_WITH_WILL)
    honest = mqtt_probe(mosquitto, "dev-6", will=(topic("state", "dev-6"), b"offline"))
    honest.client.disconnect(reasoncode=DISCONNECT_WITH_WILL)

    will = aggregator.wait_for(topic("state", "dev-6"))
    assert will.payload == b"offline" and will.retain is False  # live delivery; retained for late joiners
    assert topic("state", "dev-5") not in aggregator.topics()
    late = mqtt_probe(mosquitto, AGGREGATOR)
    late.subscribe(topic("state", "+"))
    retained = late.wait_for(topic("state", "dev-6"))
    assert retained.retain and retained.payload == b"offline"


# --- what a device may read ----------------------------------------------------------------------


def test_device_reads_task_round_chunks_and_its_own_down(mosquitto, mqtt_probe):
    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    assert accepted(aggregator.publish(topic("task"), b"task spec", retain=True))
    assert accepted(aggregator.publish(topic("round"), b"round 3", retain=True))

    device = mqtt_probe(mosquitto, "dev-7")
    device.subscribe(topic("task"))
    device.subscribe(f"{topic('round')}/#")
    device.subscribe(topic("down", "dev-7"))
    assert device.wait_for(topic("task")).payload == b"task spec"  # retained
    assert device.wait_for(topic("round")).payload == b"round 3"  # `round/#` matches `round`

    assert accepted(aggregator.publish(f"{topic('round')}/3/chunk/0", b"chunk"))
    assert accepted(aggregator.publish(topic("down", "dev-7"), b"directive"))
    assert device.wait_for(f"{topic('round')}/3/chunk/0").payload == b"chunk"
    assert device.wait_for(topic("down", "dev-7")).payload == b"directive"


def test_device_never_receives_other_devices_traffic_even_with_wildcards(mosquitto, mqtt_probe):
    snoop = mqtt_probe(mosquitto, "dev-8")
    for name in ("fedmask/#", topic("down", "dev-9"), topic("up", "+"), f"$share/snoop/{topic('up', '+')}"):
        # mosquitto 2.0.11 grants every SUBSCRIBE; the ACL bites at delivery.
        assert not snoop.subscribe(name)[0].is_failure
    victim = mqtt_probe(mosquitto, "dev-9")
    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    victim.publish(topic("up", "dev-9"), b"private update")
    victim.publish(topic("state", "dev-9"), b"online")
    aggregator.publish(topic("down", "dev-9"), b"private directive")
    # Sentinel from the aggregator, published after everything above, readable by dev-8.
    aggregator.publish(topic("down", "dev-8"), b"sentinel")
    snoop.wait_for(topic("down", "dev-8"))
    leaked = [t for t in snoop.topics() if t.endswith("/dev-9")]
    assert leaked == []


# --- the aggregator ------------------------------------------------------------------------------


def test_aggregator_writes_task_round_down_and_reads_up_and_state(mosquitto, mqtt_probe):
    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    aggregator.subscribe(topic("up", "+"))
    aggregator.subscribe(topic("state", "+"))
    for name in (topic("task"), topic("round"), f"{topic('round')}/1/chunk/2", topic("down", "dev-10")):
        assert accepted(aggregator.publish(name, b"x")), name
    device = mqtt_probe(mosquitto, "dev-10")
    device.publish(topic("up", "dev-10"), b"u")
    device.publish(topic("state", "dev-10"), b"s")
    assert aggregator.wait_for(topic("up", "dev-10")).payload == b"u"
    assert aggregator.wait_for(topic("state", "dev-10")).payload == b"s"


def test_aggregator_cannot_forge_device_updates_or_presence(mosquitto, mqtt_probe):
    aggregator = mqtt_probe(mosquitto, AGGREGATOR)
    assert aggregator.publish(topic("up", "dev-1"), b"forged").value == NOT_AUTHORIZED
    assert aggregator.publish(topic("state", "dev-1"), b"forged").value == NOT_AUTHORIZED
    assert aggregator.publish("other/topic", b"x").value == NOT_AUTHORIZED


def test_aggregator_workers_share_the_update_stream(mosquitto, mqtt_probe):
    shared = f"$share/aggregators/{topic('up', '+')}"
    workers = [mqtt_probe(mosquitto, AGGREGATOR) for _ in range(2)]
    for worker in workers:
        assert not worker.subscribe(shared)[0].is_failure
    device = mqtt_probe(mosquitto, "dev-11")
    sent = 10
    for n in range(sent):
        device.publish(topic("up", "dev-11"), f"update {n}".encode())

    def total() -> int:
        return sum(len(w.messages) for w in workers)

    wait_until(lambda: total() >= sent, 5.0, f"{sent} shared messages")
    payloads = sorted(m.payload for w in workers for m in w.messages)
    assert payloads == sorted(f"update {n}".encode() for n in range(sent))  # each exactly once
    assert all(w.messages for w in workers)  # both workers got a share
