"""The packaged dev.conf and production.conf, run by the real mosquitto.

production.conf is started as shipped except for what only a host can provide: certificate,
password-file, ACL and persistence paths, the log destination, the user to run as, and the ports
(moved to free loopback ports). The certificates come from the packaged make_ca.sh.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from fixtures.broker import Endpoint, MqttProbe

from fedmask.broker_config import configs
from fedmask.broker_config.binaries import find_mosquitto
from fedmask.broker_config.configs import current_user, remap_listeners, set_options
from fedmask.broker_config.credentials import Credentials
from fedmask.broker_config.embedded import MosquittoProcess, free_loopback_port, wait_until_listening
from fedmask.broker_config.passwords import hash_password, write_password_file

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]
USERS = ("aggregator", "health", "dev-1", "dev-2")


class ProductionBroker:
    """production.conf running on loopback: one port per packaged listener."""

    host = "127.0.0.1"

    def __init__(self, device_port: int, worker_port: int, health_port: int, ca: Path) -> None:
        self.port, self.worker_port, self.health_port, self.ca = device_port, worker_port, health_port, ca

    def credentials(self, user: str) -> Credentials:
        return Credentials(user, f"pw-{user}")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("certs")
    script = configs.PACKAGE_DIR / "make_ca.sh"
    subprocess.run(["sh", str(script), str(out), "localhost", "127.0.0.1"], check=True, capture_output=True)
    return out


def start(config_text: str, workdir: Path, port: int) -> MosquittoProcess:
    config = workdir / "mosquitto.conf"
    config.write_text(config_text)
    process = MosquittoProcess(find_mosquitto(), config, workdir / "mosquitto.log", "127.0.0.1", port)
    process.start(timeout=10)
    return process


def per_listener(text: str, name: str, values: list[str]) -> str:
    """Give the n-th line setting ``name`` the n-th value (one per listener, in file order)."""
    remaining = list(values)
    out = []
    for line in text.splitlines():
        if line.split(None, 1)[:1] == [name]:
            line = f"{name} {remaining.pop(0)}"
        out.append(line)
    assert not remaining, f"fewer {name} lines than values"
    return "\n".join(out) + "\n"


@pytest.fixture
def production(tmp_path, certificates):
    # One password file per listener, as production.conf names them: devices, aggregator, health.
    accounts = {"devices": ("dev-1", "dev-2"), "aggregator": ("aggregator",), "health": ("health",)}
    files = []
    for listener, users in accounts.items():
        passwd = tmp_path / f"{listener}.passwd"
        write_password_file(passwd, {user: hash_password(f"pw-{user}") for user in users})
        files.append(str(passwd))
    ports = {8883: free_loopback_port(), 8884: free_loopback_port(), 1883: free_loopback_port()}
    text = remap_listeners(configs.NAMED_CONFIGS["production"].read_text(), ports, host="127.0.0.1")
    text = per_listener(text, "password_file", files)
    text = set_options(
        text,
        {
            "cafile": str(certificates / "ca.crt"),
            "certfile": str(certificates / "broker.crt"),
            "keyfile": str(certificates / "broker.key"),
            "acl_file": str(configs.ACL_FILE),
            "persistence_location": f"{tmp_path}/",
            "log_dest": "stderr",
            "pid_file": None,
            "user": current_user(),
        },
    )
    process = start(text, tmp_path, ports[8883])
    # start() waited for the first listener; mosquitto opens the others right after it.
    for port in (ports[8884], ports[1883]):
        assert wait_until_listening("127.0.0.1", port, 5.0, lambda: process.running), port
    try:
        yield ProductionBroker(ports[8883], ports[8884], ports[1883], certificates / "ca.crt")
    finally:
        process.stop()


def tls_probe(broker: ProductionBroker, mqtt_probe, user: str, port: int | None = None, **options):
    return mqtt_probe(broker, user, tls=str(broker.ca), port=port or broker.port, **options)


def test_devices_connect_over_tls_and_reach_the_aggregator_listener(production, mqtt_probe):
    aggregator = tls_probe(production, mqtt_probe, "aggregator", port=production.worker_port)
    aggregator.subscribe("$share/aggregators/fedmask/v1/fleet-a/up/+")
    device = tls_probe(production, mqtt_probe, "dev-1")
    assert device.client.socket().version() in ("TLSv1.2", "TLSv1.3")
    assert not device.publish("fedmask/v1/fleet-a/up/dev-1", b"update").is_failure
    assert aggregator.wait_for("fedmask/v1/fleet-a/up/dev-1").payload == b"update"
    # The production ACL is the project ACL: no forging another device's update.
    assert device.publish("fedmask/v1/fleet-a/up/dev-2", b"forged").value == 0x87


def test_plain_mqtt_is_not_served_on_the_tls_port(production):
    probe = MqttProbe(production.host, production.port, credentials=production.credentials("dev-1"))
    try:
        with pytest.raises(ConnectionError, match="before CONNACK"):
            probe.connect(timeout=5)
        assert probe.connack is None
    finally:
        probe.close()


def test_a_client_that_does_not_trust_the_private_ca_cannot_connect(production):
    probe = MqttProbe(production.host, production.port, credentials=production.credentials("dev-1"), tls=True)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            probe.connect(timeout=2)
    finally:
        probe.close()


def test_anonymous_clients_are_refused_on_every_listener(production, mqtt_probe):
    for port, tls in (
        (production.port, True),
        (production.worker_port, True),
        (production.health_port, False),
    ):
        probe = mqtt_probe(
            production, port=port, tls=str(production.ca) if tls else None, expect_refusal=True
        )
        assert probe.connack.is_failure, port


def test_device_port_pins_client_id_to_username_so_sessions_cannot_be_taken_over(production, mqtt_probe):
    victim = tls_probe(production, mqtt_probe, "dev-1", client_id="shared-id")
    tls_probe(production, mqtt_probe, "dev-2", client_id="shared-id")
    # dev-1 is still connected and served: its client id is really "dev-1".
    victim.subscribe("fedmask/v1/fleet-a/task")
    assert not victim.publish("fedmask/v1/fleet-a/up/dev-1", b"still here").is_failure
    assert victim.disconnects == 0


def test_worker_port_keeps_client_ids_so_aggregator_workers_coexist(production, mqtt_probe):
    workers = [
        tls_probe(production, mqtt_probe, "aggregator", port=production.worker_port, client_id=f"worker-{n}")
        for n in range(2)
    ]
    for worker in workers:
        assert not worker.publish("fedmask/v1/fleet-a/round", b"r").is_failure
    assert all(w.disconnects == 0 for w in workers)
    # Contrast: the same client id twice on this port is a session takeover that disconnects the
    # first client, which is what the device port prevents.
    tls_probe(production, mqtt_probe, "aggregator", port=production.worker_port, client_id="worker-0")
    workers[0].wait_until(lambda: workers[0].disconnects > 0, 5.0, "takeover")
    assert workers[1].disconnects == 0


def test_only_the_aggregator_account_logs_in_on_the_aggregator_listener(production, mqtt_probe):
    """A device account with the aggregator's client id used to kick the aggregator off this listener
    (and its persistent session, queued updates included, was thrown away)."""
    aggregator = tls_probe(
        production, mqtt_probe, "aggregator", port=production.worker_port, client_id="fedmask-aggregator-a"
    )
    for client_id in ("fedmask-aggregator-a", "anything"):
        intruder = tls_probe(
            production,
            mqtt_probe,
            "dev-1",
            port=production.worker_port,
            client_id=client_id,
            expect_refusal=True,
        )
        assert intruder.connack.is_failure, client_id
    assert not aggregator.publish("fedmask/v1/fleet-a/round", b"r").is_failure
    assert aggregator.disconnects == 0


def test_only_the_health_account_logs_in_on_the_plaintext_listener(production, mqtt_probe):
    """Device (and aggregator) accounts cannot log in unencrypted: no update travels in the clear."""
    for user in ("dev-1", "aggregator"):
        probe = mqtt_probe(production, user, port=production.health_port, expect_refusal=True)
        assert probe.connack.is_failure, user
    assert not mqtt_probe(production, "health", port=production.health_port).connack.is_failure


def test_health_probe_reads_uptime_on_the_loopback_listener(production, mqtt_probe):
    probe = mqtt_probe(production, "health", port=production.health_port)
    probe.subscribe("$SYS/broker/uptime")
    assert probe.wait_for("$SYS/broker/uptime").payload.endswith(b"seconds")


def test_dev_config_serves_anonymous_clients_on_loopback(tmp_path, mqtt_probe):
    port = free_loopback_port()
    dev = configs.NAMED_CONFIGS["dev"].read_text()
    text = set_options(
        remap_listeners(dev, {1883: port}),
        {"persistence_location": f"{tmp_path}/", "user": current_user()},
    )
    process = start(text, tmp_path, port)
    try:
        dev = Endpoint("127.0.0.1", port)
        subscriber = mqtt_probe(dev)
        subscriber.subscribe("anything/#")
        mqtt_probe(dev).publish("anything/at/all", b"hello")
        assert subscriber.wait_for("anything/at/all").payload == b"hello"
    finally:
        process.stop()
    assert (tmp_path / "mosquitto.db").is_file()  # persistence written on clean shutdown
