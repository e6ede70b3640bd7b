"""Group commit in the aggregator (issue 11): a receipt is never published before its update is durable,
and a batch that holds the same update twice stores it once. Real Mosquitto, real SQLite; the killed
aggregator is a `fedmask aggregator run` process.
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures.broker import BrokerHandle, MqttProbe
from fixtures.fleet import aggregator_command, fedmask_task, mask_update, poll

from fedmask.aggregator.service import AggregatorService
from fedmask.protocol import messages
from fedmask.protocol.faults import ENV
from fedmask.protocol.topics import Topics
from fedmask.storage import Store

pytestmark = pytest.mark.broker

FLEET = "group-commit"
TOPICS = Topics(FLEET)
NUM_CLASSES = 14
TASK_ID = "batches"


class Devices:
    """One raw MQTT client speaking for many devices, recording every directive on their downlinks."""

    def __init__(self, broker: BrokerHandle) -> None:
        self.client = MqttProbe(broker.host, broker.port, client_id="group-commit-devices")
        self.client.connect()
        self.client.subscribe(f"{TOPICS.prefix}/down/+")

    def online(self, device: str) -> None:
        presence = messages.Presence(fleet=FLEET, device=device, status="online", at=time.time())
        self.client.publish(TOPICS.state(device), messages.encode(presence), retain=True)

    def publish(self, device: str, payload: bytes) -> None:
        self.client.publish(TOPICS.up(device), payload)

    def answers(self) -> list[tuple[str, messages.Directive]]:
        """(device, directive) of every receipt or rejection so far."""
        out = []
        for m in list(self.client.messages):
            if m.topic.startswith(f"{TOPICS.prefix}/down/"):
                directive = messages.decode(bytes(m.payload), messages.Directive)
                out.append((m.topic.rsplit("/", 1)[1], directive))
        return out

    def receipted(self) -> set[str]:
        return {device for device, d in self.answers() if d.kind == "receipt"}

    def close(self) -> None:
        self.client.close()


def update(device: str, num_bits: int, seed: int) -> bytes:
    return mask_update(FLEET, TASK_ID, device, np.random.default_rng(seed).random(num_bits) < 0.5)


def stored_rows(db: Path) -> collections.Counter[str]:
    """Stored updates of the task by device (every round): each must be 1."""
    with Store(f"sqlite:///{db}") as store:
        return collections.Counter(u.device_id for u in store.accepted_updates(TASK_ID, 1))


def num_bits() -> int:
    from fedmask.device_agent.agent import spec_from_task
    from fedmask.strategies.fedmask import FedMaskServer

    task = fedmask_task(FLEET, NUM_CLASSES, task_id=TASK_ID, rounds=1, quorum=1000, deadline_s=600.0)
    return FedMaskServer(spec_from_task(task)).num_bits


@pytest.mark.parametrize("store_writer", ["thread", "process"])
def test_a_receipt_is_never_published_before_its_batch_is_durable(
    open_mosquitto: BrokerHandle, tmp_path: Path, fedmask_processes, store_writer: str
) -> None:
    """The aggregator is SIGKILLed between judging a batch and committing it (its third batch): no
    device got a receipt for an update that is not stored, every receipted update is stored exactly
    once, and after a restart the broker's redeliveries complete the rest, each stored once. With the
    store writer in a child process too (which must then exit with its parent)."""
    flags = ["--batch-max", "8", "--batch-wait-ms", "200", "--store-writer", store_writer]
    command, db = aggregator_command(tmp_path, open_mosquitto.url(), FLEET, TASK_ID, NUM_CLASSES, flags)
    names = [f"dev-{i:02d}" for i in range(40)]
    bits = num_bits()
    # Known from the store (as after their presences), not from presence messages: presences are
    # batched too, and the kill must hit a batch of updates.
    with Store(f"sqlite:///{db}") as store:
        store.upgrade()
        for name in names:
            store.upsert_device(FLEET, name, presence="online")
    devices = Devices(open_mosquitto)
    try:
        first = fedmask_processes(command, log="aggregator-1.log", env={ENV: "aggregator.before_commit@3"})
        first.wait_for_log("aggregator serving", 60)
        for i, name in enumerate(names):
            devices.publish(name, update(name, bits, i))
        poll(lambda: not first.running, 60, "the aggregator killed at its third commit")
        assert "fault injection: SIGKILL at aggregator.before_commit" in first.log()
        if store_writer == "process":  # its child reads end-of-file on its pipe and exits too
            writer_pid = int(re.search(r"store writer process (\d+) serving", first.log()).group(1))
            poll(
                lambda: not Path(f"/proc/{writer_pid}").exists(), 15, "the store writer gone with its parent"
            )
        time.sleep(0.5)  # anything the dead process had in flight would have arrived by now

        rows = stored_rows(db)
        receipted = devices.receipted()
        assert receipted, "the two batches committed before the kill were answered"
        assert receipted <= set(rows), f"receipts without a stored row: {sorted(receipted - set(rows))}"
        assert set(rows.values()) == {1}
        assert len(rows) < len(names), "the killed batch was not stored"

        second = fedmask_processes(command, log="aggregator-2.log")
        # As a device does: republish (the same bytes) what has no receipt. The receipts of the last
        # batch committed before the kill may have died with the process, queued and not yet written
        # (they are published without waiting): those updates are stored and acked, so only their
        # devices' republishing, answered as duplicates, gets them a receipt.
        for i, name in enumerate(names):
            if name not in receipted:
                devices.publish(name, update(name, bits, i))
        poll(lambda: devices.receipted() == set(names), 60, "a receipt for every device after the restart")
        second.kill()
        rows = stored_rows(db)
        assert set(rows) == set(names) and set(rows.values()) == {1}
        assert [d for _, d in devices.answers() if d.kind != "receipt"] == []
    finally:
        devices.close()


def test_a_batch_holding_the_same_update_twice_stores_one_row_and_answers_both(
    open_mosquitto: BrokerHandle, tmp_path: Path
) -> None:
    """The same bytes twice (a redelivery) and different bytes for the same base round (a replay) in
    one batch: one stored row, two receipts for the redelivery, a rejection for the replay."""
    task = fedmask_task(FLEET, NUM_CLASSES, task_id=TASK_ID, rounds=1, quorum=1000, deadline_s=600.0)
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    # A batch closes at 4 messages or after 2 s: the four below share one.
    service = AggregatorService(open_mosquitto.url(), FLEET, task, store, batch_max=4, batch_wait_s=2.0)
    devices = Devices(open_mosquitto)
    bits = service.manager.expected["mask"][0]
    try:
        for name in ("a", "b", "c"):
            devices.online(name)
        service.start()
        # Presences are batched too: theirs is committed (by the 2 s wait or a tick) before the updates.
        poll(lambda: sum(service.batch_sizes) == 3, 10, "the devices' presences committed")
        assert {"a", "b", "c"} <= service.manager.known_devices
        before = len(service.batch_sizes)
        first = update("a", bits, 1)
        for device, payload in (
            ("a", first),
            ("a", first),
            ("b", update("b", bits, 2)),
            ("b", update("b", bits, 3)),
        ):
            devices.publish(device, payload)
        poll(lambda: len(devices.answers()) >= 4, 15, "four answers")
        assert service.batch_sizes[before:] == [4]
        answers = sorted((device, d.kind, d.reason) for device, d in devices.answers())
        assert answers == [
            ("a", "receipt", None),
            ("a", "receipt", None),
            ("b", "receipt", None),
            ("b", "rejected", "replayed_update"),
        ]
        rows = collections.Counter(u.device_id for u in store.accepted_updates(TASK_ID, 1))
        assert rows == {"a": 1, "b": 1}
        assert service.manager.current is not None and set(service.manager.current.contributors) == {"a", "b"}
    finally:
        service.stop()
        devices.close()
        store.close()
