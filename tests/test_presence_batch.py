"""Presence in the aggregator's group commit: a reconnection storm is stored in a few transactions, the
newest presence wins, and a presence judged but not committed when the aggregator dies is delivered
again and stored after the restart. Real Mosquitto, real SQLite file; the killed aggregator is a
`fedmask aggregator run` process.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures.broker import BrokerHandle, MqttProbe
from fixtures.fleet import aggregator_command, fedmask_task, mask_update, poll
from sqlalchemy import event

from fedmask.aggregator.service import AggregatorService
from fedmask.protocol import messages
from fedmask.protocol.faults import ENV
from fedmask.protocol.topics import Topics
from fedmask.storage import Store

pytestmark = pytest.mark.broker

FLEET = "presence-storm"
TOPICS = Topics(FLEET)
NUM_CLASSES = 14
TASK_ID = "storm"
UTC = dt.timezone.utc


def presence(device: str, status: str, at: float, **capabilities: object) -> bytes:
    return messages.encode(
        messages.Presence(fleet=FLEET, device=device, status=status, at=at, capabilities=dict(capabilities))
    )


def directives(probe: MqttProbe) -> list[tuple[str, messages.Directive]]:
    out = []
    for m in list(probe.messages):
        if m.topic.startswith(f"{TOPICS.prefix}/down/"):
            out.append((m.topic.rsplit("/", 1)[1], messages.decode(bytes(m.payload), messages.Directive)))
    return out


def test_a_presence_storm_is_committed_in_few_transactions(
    open_mosquitto: BrokerHandle, tmp_path: Path
) -> None:
    """200 devices come online (each a retained presence), 100 of them then send a will or an offline
    presence (50 older than their online one: it must not win; 50 newer: it must), and 50 send their
    first update right after their presence, maybe in the same batch. Everything is stored with the
    newest-wins result, in batches, not one transaction per presence."""
    task = fedmask_task(FLEET, NUM_CLASSES, task_id=TASK_ID, rounds=1, quorum=1000, deadline_s=600.0)
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    commits: list[float] = []
    event.listen(store.engine, "commit", lambda connection: commits.append(time.monotonic()))
    service = AggregatorService(open_mosquitto.url(), FLEET, task, store, batch_max=64, batch_wait_s=0.05)
    probe = MqttProbe(open_mosquitto.host, open_mosquitto.port, client_id="storm-devices")
    names = [f"dev-{i:03d}" for i in range(200)]
    senders = names[100:150]
    t0 = time.time() - 60
    digest = bytes(range(8))
    try:
        service.start()
        probe.connect()
        probe.subscribe(f"{TOPICS.prefix}/down/+")
        before = len(commits)
        bits = service.manager.expected["mask"][0]
        for name in names:  # the devices holding a consensus name it with bytes: stored as hex
            probe.publish(
                TOPICS.state(name),
                presence(name, "online", t0, ram_mb=512, consensus=[1, digest]),
                retain=True,
            )
        for i, name in enumerate(names[:100]):
            at = t0 - 5 if i < 50 else t0 + 5
            probe.publish(TOPICS.state(name), presence(name, "offline", at), retain=True)
        for i, name in enumerate(senders):
            mask = np.random.default_rng(i).random(bits) < 0.5
            probe.publish(TOPICS.up(name), mask_update(FLEET, TASK_ID, name, mask))
        poll(
            lambda: sum(service.batch_sizes) == len(names) + 100 + len(senders), 30, "every message committed"
        )
        poll(lambda: len(directives(probe)) == len(senders), 10, "an answer to every update")
        storm_commits = len(commits) - before
    finally:
        service.stop()
        probe.close()
    assert sorted((device, d.kind) for device, d in directives(probe)) == [(n, "receipt") for n in senders]
    # One transaction per batch (and a few reads), not one per presence: 350 messages.
    assert len(service.batch_sizes) <= 40, service.batch_sizes
    assert storm_commits <= 60, storm_commits
    devices = {d.device_id: d for d in store.list_devices(FLEET)}
    assert set(devices) == set(names)
    at = dt.datetime.fromtimestamp(t0, UTC)
    expected = {name: ("online", at) for name in names}
    expected.update({name: ("offline", at + dt.timedelta(seconds=5)) for name in names[50:100]})
    assert {name: (d.presence, d.presence_at) for name, d in devices.items()} == expected
    assert {d.capabilities["consensus"][1] for d in devices.values()} == {digest.hex()}
    assert {name: devices[name].updates for name in senders} == dict.fromkeys(senders, 1)
    assert {name: d.first_seen_at for name, d in devices.items() if name in names[:50]} == dict.fromkeys(
        names[:50], at - dt.timedelta(seconds=5)
    )
    # The aggregator's own view agrees with the store.
    memory = {
        name: (status, dt.datetime.fromtimestamp(when, UTC))
        for name, (when, status) in service.manager.presence.items()
    }
    assert memory == expected
    assert set(names) <= service.manager.known_devices
    store.close()


def test_a_presence_judged_but_not_committed_is_delivered_again_and_stored(
    open_mosquitto: BrokerHandle, tmp_path: Path, fedmask_processes
) -> None:
    """The aggregator is SIGKILLed before committing the batch holding the presences (not retained,
    so only the broker's redelivery of the unacknowledged messages can bring them back): nothing is
    stored, and the restarted aggregator stores every one."""
    flags = ["--batch-max", "64", "--batch-wait-ms", "300"]
    command, db = aggregator_command(tmp_path, open_mosquitto.url(), FLEET, TASK_ID, NUM_CLASSES, flags)
    names = [f"dev-{i}" for i in range(5)]
    t0 = time.time() - 30
    probe = MqttProbe(open_mosquitto.host, open_mosquitto.port, client_id="presence-devices")
    probe.connect()
    try:
        first = fedmask_processes(command, log="aggregator-1.log", env={ENV: "aggregator.before_commit@1"})
        first.wait_for_log("aggregator serving", 60)
        for i, name in enumerate(names):
            probe.publish(TOPICS.state(name), presence(name, "online", t0 + i, ram_mb=i))
        poll(lambda: not first.running, 30, "the aggregator killed at its first commit")
        assert "fault injection: SIGKILL at aggregator.before_commit" in first.log()
        with Store(f"sqlite:///{db}") as store:
            assert store.list_devices(FLEET) == []

        second = fedmask_processes(command, log="aggregator-2.log")
        with Store(f"sqlite:///{db}") as store:
            stored = poll(
                lambda: store.list_devices(FLEET) if len(store.list_devices(FLEET)) == 5 else None,
                60,
                "5 presences stored",
            )
        second.kill()
    finally:
        probe.close()
    got = {d.device_id: (d.presence, d.presence_at, d.capabilities) for d in stored}
    assert got == {
        name: ("online", dt.datetime.fromtimestamp(t0 + i, UTC), {"ram_mb": i})
        for i, name in enumerate(names)
    }


def test_without_batching_each_presence_is_committed_and_acked_in_its_handler(
    open_mosquitto: BrokerHandle, tmp_path: Path
) -> None:
    """``batch_max=1`` (the baseline): a presence is its own transaction, committed before the next
    message is looked at; a newer offline then an older online leaves the device offline."""
    task = fedmask_task(FLEET, NUM_CLASSES, task_id=TASK_ID, rounds=1, quorum=1000, deadline_s=600.0)
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    service = AggregatorService(open_mosquitto.url(), FLEET, task, store, batch_max=1, batch_wait_s=0.0)
    probe = MqttProbe(open_mosquitto.host, open_mosquitto.port, client_id="baseline-devices")
    t0 = time.time() - 60
    try:
        service.start()
        probe.connect()
        probe.subscribe(f"{TOPICS.prefix}/down/+")
        bits = service.manager.expected["mask"][0]
        probe.publish(TOPICS.state("solo"), presence("solo", "online", t0, ram_mb=64), retain=True)
        probe.publish(TOPICS.up("solo"), mask_update(FLEET, TASK_ID, "solo", np.ones(bits, dtype=bool)))
        probe.publish(TOPICS.state("solo"), presence("solo", "offline", t0 + 2), retain=True)
        probe.publish(TOPICS.state("solo"), presence("solo", "online", t0 + 1, ram_mb=64), retain=True)
        poll(lambda: len(service.batch_sizes) == 4, 10, "four commits")
        poll(lambda: directives(probe), 10, "the update's receipt")
    finally:
        service.stop()
        probe.close()
    assert service.batch_sizes == [1, 1, 1, 1]
    assert [d.kind for _, d in directives(probe)] == ["receipt"]
    (device,) = store.list_devices(FLEET)
    assert (device.presence, device.presence_at) == ("offline", dt.datetime.fromtimestamp(t0 + 2, UTC))
    assert (device.capabilities, device.updates) == ({"ram_mb": 64}, 1)
    assert service.manager.presence["solo"] == (t0 + 2, "offline")
    store.close()
