"""Accounts written by `add_device` / `add_service_user` are accepted by a real mosquitto, both
when `mosquitto_passwd` writes them and when the PBKDF2-SHA512 hash is written directly."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from fixtures.broker import BrokerHandle, wait_until

from fedmask.broker_config.binaries import find_mosquitto, find_mosquitto_passwd
from fedmask.broker_config.credentials import (
    Credentials,
    add_device,
    add_service_user,
    read_credentials,
)
from fedmask.broker_config.embedded import EmbeddedBroker
from fedmask.broker_config.passwords import read_password_file, verify_password

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]
HASH_WRITERS = [
    pytest.param(
        True,
        id="mosquitto_passwd",
        marks=pytest.mark.skipif(find_mosquitto_passwd() is None, reason="mosquitto_passwd is not installed"),
    ),
    pytest.param(False, id="native-pbkdf2"),
]


@pytest.fixture
def empty_broker(tmp_path):
    """An authenticated broker whose password file the test fills in (no accounts yet)."""
    with EmbeddedBroker(auth=True, users={}, workdir=tmp_path / "broker") as broker:
        yield broker


def login(broker: EmbeddedBroker, mqtt_probe, credentials: Credentials) -> bool:
    probe = mqtt_probe(BrokerHandle(broker), credentials=credentials, expect_refusal=True)
    accepted = not probe.connack.is_failure
    probe.close()
    return accepted


@pytest.mark.parametrize("use_tool", HASH_WRITERS)
def test_added_accounts_are_accepted_by_mosquitto(empty_broker, mqtt_probe, tmp_path, use_tool):
    empty_broker.stop()
    passwd = empty_broker.password_file
    device_pw = add_device(passwd, "dev-1", use_tool=use_tool, credentials_file=tmp_path / "dev-1.cred")
    aggregator_pw = add_service_user(passwd, "aggregator", "agg-secret", use_tool=use_tool)
    empty_broker.start()

    # The agent's path: read the credentials file, log in with it.
    device = read_credentials(tmp_path / "dev-1.cred")
    assert device == Credentials("dev-1", device_pw)
    assert login(empty_broker, mqtt_probe, device)
    assert login(empty_broker, mqtt_probe, Credentials("aggregator", aggregator_pw))
    assert not login(empty_broker, mqtt_probe, Credentials("dev-1", device_pw + "x"))
    assert not login(empty_broker, mqtt_probe, Credentials("dev-2", device_pw))


@pytest.mark.skipif(find_mosquitto_passwd() is None, reason="mosquitto_passwd is not installed")
def test_hashes_written_by_mosquitto_passwd_verify_with_our_reader(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.touch()
    tool = str(find_mosquitto_passwd())
    subprocess.run([tool, "-b", str(passwd), "dev-1", "from the tool"], check=True, capture_output=True)
    stored = read_password_file(passwd)["dev-1"]
    assert verify_password("from the tool", stored)
    assert not verify_password("from the tool!", stored)


def test_device_added_to_a_running_broker_logs_in_after_reload(empty_broker, mqtt_probe):
    first = add_device(empty_broker.password_file, "dev-3")
    empty_broker.reload()
    wait_until(
        lambda: login(empty_broker, mqtt_probe, Credentials("dev-3", first)), 5.0, "login after SIGHUP"
    )

    second = add_device(empty_broker.password_file, "dev-3")  # rotate the secret
    assert second != first
    empty_broker.reload()
    wait_until(lambda: login(empty_broker, mqtt_probe, Credentials("dev-3", second)), 5.0, "new password")
    assert not login(empty_broker, mqtt_probe, Credentials("dev-3", first))


def test_concurrent_add_device_keeps_every_entry(tmp_path):
    passwd = tmp_path / "passwd"
    devices = [f"dev-{n}" for n in range(1, 9)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        passwords = dict(zip(devices, pool.map(lambda d: add_device(passwd, d), devices), strict=True))
    entries = read_password_file(passwd)
    assert sorted(entries) == sorted(devices)
    assert all(verify_password(passwords[d], entries[d]) for d in devices)
