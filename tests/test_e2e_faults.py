"""The faults of issue 10, each over a real Mosquitto and a real SQLite store, against the aggregator
service; a raw MQTT client speaks for the devices (no training needed, so each test takes seconds).
The agent's side of the same faults runs `fedmask agent run` processes: `test_e2e_agent_faults.py`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures.broker import BrokerHandle, MqttProbe
from fixtures.fleet import accepted_devices, fedmask_task, poll, presence, round_state
from test_protocol_messages import safetensors_file, tiny_tflite

from fedmask.aggregator.service import AggregatorService
from fedmask.protocol import messages
from fedmask.protocol.tensor_codec import Coded
from fedmask.protocol.topics import Topics
from fedmask.storage import Store

pytestmark = pytest.mark.broker

FLEET = "e2e-faults"
TOPICS = Topics(FLEET)
NUM_CLASSES = 14


class Devices:
    """A raw MQTT client publishing for any device of the (open) broker and reading every downlink."""

    def __init__(self, broker: BrokerHandle, num_bits: int, task: messages.Task) -> None:
        self.task = task
        self.num_bits = num_bits
        self.rng = np.random.default_rng(0)
        self.client = MqttProbe(broker.host, broker.port, client_id="raw-devices")
        self.client.connect()
        self.client.subscribe(f"{TOPICS.prefix}/down/+")

    def online(self, device: str, at: float | None = None, status: str = "online") -> None:
        message = messages.Presence(
            fleet=FLEET, device=device, status=status, at=time.time() if at is None else at
        )
        self.client.publish(TOPICS.state(device), messages.encode(message), retain=True)

    def update(self, device: str, round_no: int, base_round: int | None = None) -> bytes:
        update = messages.Update(
            fleet=FLEET,
            task_id=self.task.task_id,
            device=device,
            round=round_no,
            base_round=round_no if base_round is None else base_round,
            num_samples=50,
            metrics={"loss": 1.0},
            body={"mask": Coded(self.rng.random(self.num_bits) < 0.5, "bits")},
        )
        return messages.encode(update)

    def result(self, device: str) -> bytes:
        result = messages.Result(
            fleet=FLEET,
            task_id=self.task.task_id,
            device=device,
            metrics={
                "accuracy": 0.5,
                "latency_ms": 1.0,
                "size_bytes": 100,
                "peak_rss_bytes": 1000,
                "num_test": 8,
                "density": 0.5,
            },
            mask=b"\x01",
            weights=safetensors_file({"w": np.ones((2, 2), np.float32)}),
            tflite=tiny_tflite(),
        )
        return messages.encode(result)

    def publish(self, device: str, payload: bytes) -> None:
        self.client.publish(TOPICS.up(device), payload)

    def directives(self, device: str) -> list[messages.Directive]:
        return [
            messages.decode(bytes(m.payload), messages.Directive)
            for m in list(self.client.messages)
            if m.topic == TOPICS.down(device)
        ]

    def send(self, device: str, payload: bytes) -> messages.Directive:
        """Publish and return the aggregator's answer (receipt or rejection)."""
        answered = len(self.directives(device))
        self.publish(device, payload)
        poll(lambda: len(self.directives(device)) > answered, 15, f"an answer to {device}")
        return self.directives(device)[answered]

    def close(self) -> None:
        self.client.close()


def _store(tmp_path: Path, name: str = "store.db") -> Store:
    store = Store(f"sqlite:///{tmp_path / name}")
    store.upgrade()
    return store


def _task(task_id: str, **schedule) -> messages.Task:
    return fedmask_task(FLEET, NUM_CLASSES, task_id=task_id, **schedule)


def _bits(service: AggregatorService) -> int:
    return service.manager.expected["mask"][0]


def test_a_stale_update_republished_rounds_later_is_stored_once_and_answered_with_its_receipt(
    open_mosquitto: BrokerHandle, tmp_path: Path
) -> None:
    """Fault 1: the idempotency key is (task, device, base round), whichever round stored it."""
    task = _task("stale-twice", rounds=4, quorum=2, deadline_s=600.0, staleness_bound=2)
    store = _store(tmp_path)
    service = AggregatorService(open_mosquitto.url(), FLEET, task, store)
    devices = Devices(open_mosquitto, _bits(service), task)
    try:
        for d in ("d1", "d2", "d3"):
            devices.online(d)
        service.start()
        poll(lambda: presence(store, FLEET, "d3") == "online", 10, "d3 registered")
        assert devices.send("d1", devices.update("d1", 1)).kind == "receipt"
        assert devices.send("d2", devices.update("d2", 1)).kind == "receipt"
        poll(lambda: round_state(store, task.task_id, 2) == "open", 10, "round 2 open")
        late = devices.update("d3", 1)  # trained from round 1, sent while round 2 is open
        first = devices.send("d3", late)
        assert (first.kind, first.round) == ("receipt", 1)
        assert devices.send("d1", devices.update("d1", 2)).kind == "receipt"
        poll(lambda: round_state(store, task.task_id, 3) == "open", 10, "round 3 open")

        again = devices.send("d3", late)  # the same bytes: it lost its receipt, say

        assert (again.kind, again.round, again.reason) == ("receipt", 1, None)
        assert accepted_devices(store, task.task_id, 3) == []
        stored = [
            (r, u.base_round)
            for r in (1, 2, 3)
            for u in store.accepted_updates(task.task_id, r)
            if u.device_id == "d3"
        ]
        assert stored == [(2, 1)]
        # Different bytes for the same base round are a replay, refused.
        replay = devices.send("d3", devices.update("d3", 1))
        assert (replay.kind, replay.reason) == ("rejected", "replayed_update")
        assert accepted_devices(store, task.task_id, 3) == []
    finally:
        service.stop()
        devices.close()
        store.close()


def test_rounds_wait_for_a_share_of_the_task_and_finalization_only_for_its_participants(
    open_mosquitto: BrokerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Faults 4 and 10: the default quorum is a share of the devices expected for the task; a round
    closes at its deadline naming who was missing; finalization waits for the task's participants
    (not every device the fleet ever saw) and names the missing ones in a non-complete outcome."""
    caplog.set_level(logging.INFO, logger="fedmask.aggregator")
    store = _store(tmp_path)
    # Devices of an earlier task in the same fleet: known to the fleet, gone now.
    for old in ("old-1", "old-2"):
        store.register_task(
            FLEET, "earlier", spec={}, seed=0, weights_digest="x", strategy="fedmask", arch="har_cnn"
        )
        store.upsert_device(FLEET, old, presence="offline")
    # The documented defaults: no quorum in the task file.
    task = _task("share", rounds=2, deadline_s=4.0)
    assert task.schedule.quorum_fraction == pytest.approx(0.8)
    task = messages.Task(
        **{**task.__dict__, "hyper": {**task.hyper, "finalize_deadline_s": 4.0}}  # type: ignore[arg-type]
    )
    service = AggregatorService(open_mosquitto.url(), FLEET, task, store)
    devices = Devices(open_mosquitto, _bits(service), task)
    try:
        for d in ("b1", "b2", "b3"):
            devices.online(d)
        service.start()
        poll(lambda: all(presence(store, FLEET, d) == "online" for d in ("b1", "b2", "b3")), 10, "online")
        devices.send("b1", devices.update("b1", 1))
        devices.send("b2", devices.update("b2", 1))
        assert round_state(store, task.task_id, 1) == "open"  # 2 of 3 expected: not yet
        devices.send("b3", devices.update("b3", 1))
        poll(lambda: round_state(store, task.task_id, 1) == "closed", 10, "round 1 closed by quorum")
        devices.send("b1", devices.update("b1", 2))
        devices.send("b2", devices.update("b2", 2))
        poll(lambda: round_state(store, task.task_id, 2) == "closed", 15, "round 2 closed at its deadline")
        assert "round 2 closed by deadline with 2 updates" in caplog.text
        assert "missing: b3" in caplog.text
        # Finalization: directives to the three participants only.
        poll(lambda: all(devices.directives(d)[-1].kind == "finalize" for d in ("b1", "b2")), 10, "finalize")
        assert devices.directives("old-1") == [] and devices.directives("old-2") == []
        assert devices.send("b1", devices.result("b1")).kind == "receipt"
        assert devices.send("b2", devices.result("b2")).kind == "receipt"
        assert service.wait(15), "finalization never ended"
    finally:
        service.stop()
        devices.close()
    outcome = service.manager.outcome
    assert outcome is not None and "1 of the task's 3 participants: b3" in outcome
    assert "old-1" not in outcome
    rounds = {r.round_no: r for r in store.list_rounds(task_id=task.task_id)}
    assert (rounds[1].closed_by, rounds[1].participants) == ("quorum", 3)
    assert (rounds[2].closed_by, rounds[2].participants) == ("deadline", 2)
    store.close()


def test_presence_keeps_the_time_of_the_message_across_an_aggregator_restart(
    open_mosquitto: BrokerHandle, tmp_path: Path, fedmask_processes, hmp_fleet
) -> None:
    """Fault 7: a retained presence replayed to a restarted aggregator is not "seen now", and a device
    whose last will fired while no aggregator ran is shown offline."""
    from fixtures.fleet import smallest

    from fedmask.datasets.federated import save_device

    task = _task("presence", rounds=3, quorum=8, deadline_s=600.0)
    store = _store(tmp_path)
    earlier = time.time() - 3600.0
    service = AggregatorService(open_mosquitto.url(), FLEET, task, store)
    devices = Devices(open_mosquitto, _bits(service), task)
    device = smallest(hmp_fleet, 1)[0]
    data_file = save_device(device, tmp_path / f"{device.device_id}.npz")
    command = [
        "agent", "run", "--broker", open_mosquitto.url(), "--fleet", FLEET, "--device-id",
        device.device_id, "--data", str(data_file), "--state-dir", str(tmp_path / "agent"), "--threads", "1",
    ]  # fmt: skip
    try:
        devices.online("quiet", at=earlier)  # online an hour ago, silent since
        service.start()
        agent = fedmask_processes(command, log="agent.log")
        poll(lambda: presence(store, FLEET, device.device_id) == "online", 60, "the agent online")
        poll(lambda: presence(store, FLEET, "quiet") == "online", 10, "quiet registered")
        service.stop()  # no aggregator from here on

        agent.kill()  # its last will (offline) is published while nobody listens but the broker
        time.sleep(1.0)
        restarted_at = time.time()
        service = AggregatorService(open_mosquitto.url(), FLEET, task, store).start()
        poll(lambda: presence(store, FLEET, device.device_id) == "offline", 10, "the agent offline")
        seen = {d.device_id: d for d in store.list_devices(FLEET)}
        assert seen["quiet"].presence == "online"
        assert seen["quiet"].last_seen_at.timestamp() == pytest.approx(earlier, abs=1.0)
        assert seen[device.device_id].last_seen_at.timestamp() < restarted_at
    finally:
        service.stop()
        devices.close()
        store.close()


def test_a_broker_that_lost_the_retained_task_gets_it_again(
    open_mosquitto: BrokerHandle, tmp_path: Path, mqtt_probe
) -> None:
    """Fault 3: mosquitto killed before its first autosave forgets the retained task and round; the
    aggregator publishes them again once it is back, so a device connecting afterwards can join."""
    task = _task("lost-task", rounds=2, quorum=2, deadline_s=600.0)
    store = _store(tmp_path)
    service = AggregatorService(open_mosquitto.url(), FLEET, task, store).start()
    try:
        early = mqtt_probe(open_mosquitto)
        early.subscribe(TOPICS.task)
        early.wait_for(TOPICS.task, 10)

        open_mosquitto.kill()  # before the 30 s autosave: nothing of this run is on disk
        open_mosquitto.start()

        late = MqttProbe(open_mosquitto.host, open_mosquitto.port)
        try:
            late.connect()
            deadline = time.monotonic() + 20
            got: set[str] = set()
            while time.monotonic() < deadline and got != {TOPICS.task, TOPICS.round}:
                late.subscribe(TOPICS.task)
                late.subscribe(TOPICS.round)
                time.sleep(0.5)
                got = {m.topic for m in list(late.messages) if m.retain}
            assert got == {TOPICS.task, TOPICS.round}, "the retained task and round never came back"
            retained = next(m for m in late.messages if m.topic == TOPICS.task)
            assert messages.decode(bytes(retained.payload), messages.Task).task_id == task.task_id
        finally:
            late.close()
    finally:
        service.stop()
        store.close()


def test_a_participant_back_online_while_finalizing_gets_the_finalize_directive_again(
    open_mosquitto: BrokerHandle, tmp_path: Path
) -> None:
    """Fault 2, the aggregator's half: a device that consumed its finalize directive and crashed is
    sent it again when its presence says it is back."""
    task = _task("refinalize", rounds=1, quorum=1, deadline_s=600.0)
    store = _store(tmp_path)
    service = AggregatorService(open_mosquitto.url(), FLEET, task, store)
    devices = Devices(open_mosquitto, _bits(service), task)
    try:
        devices.online("f1")
        service.start()
        poll(lambda: presence(store, FLEET, "f1") == "online", 10, "f1 registered")
        devices.send("f1", devices.update("f1", 1))
        poll(lambda: [d for d in devices.directives("f1") if d.kind == "finalize"], 10, "the directive")
        devices.online("f1", status="offline")
        devices.online("f1")  # restarted
        poll(
            lambda: len([d for d in devices.directives("f1") if d.kind == "finalize"]) == 2,
            10,
            "the directive sent again",
        )
        assert devices.send("f1", devices.result("f1")).kind == "receipt"
        assert service.wait(10)
        assert service.manager.outcome == "complete"
    finally:
        service.stop()
        devices.close()
        store.close()
