"""End to end over a real Mosquitto when things fail: a device agent killed mid-round, the aggregator
killed mid-round, the broker restarted mid-round. Agents and aggregator run as `fedmask` processes
where the test kills them, and in this process (threads) otherwise. Training is gated by tickets
(`TrainingTickets`), so the test decides which device contributes to which round, and when.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import pytest
import yaml
from fixtures.broker import BrokerHandle, MqttProbe
from fixtures.fleet import (
    TrainingTickets,
    accepted_devices,
    fedmask_task,
    poll,
    presence,
    round_state,
    smallest,
)

from fedmask.aggregator.service import AggregatorService
from fedmask.datasets.federated import FederatedDataset, save_device
from fedmask.device_agent.agent import AgentState, DeviceAgent
from fedmask.protocol import messages
from fedmask.protocol.topics import Topics
from fedmask.storage import Store
from fedmask.storage.mask_bases import load_masks

pytestmark = pytest.mark.broker

FLEET = "e2e-failures"


def _agent(broker: BrokerHandle, device, tmp_path: Path, tickets: TrainingTickets) -> DeviceAgent:
    return DeviceAgent(
        broker.url(),
        FLEET,
        device.device_id,
        device,
        state_dir=tmp_path / "agents",
        train_lock=tickets,
        latency_runs=5,
    )


def _stop(tickets: TrainingTickets, *services) -> None:
    tickets.shut()  # agents waiting for a ticket give up instead of training
    for service in services:
        service.stop()


@contextlib.contextmanager
def deadlines_held(aggregator: AggregatorService):
    """The in-process aggregator's clock stands still meanwhile, so no deadline passes: a round closes on
    its quorum however long the granted trainings take (one at a time). Otherwise a deadline, extended
    every few seconds while a round lacks ``min_updates``, could fall between two devices' updates and
    close the round with fewer (seen once in CI)."""
    frozen = time.time()
    aggregator.manager.clock = lambda: frozen
    try:
        yield
    finally:
        aggregator.manager.clock = time.time


def test_agent_killed_mid_round_goes_offline_and_catches_up_after_restart(
    open_mosquitto: BrokerHandle,
    hmp_fleet: FederatedDataset,
    one_torch_thread: None,
    fedmask_processes,
    tmp_path: Path,
) -> None:
    first, second, crashing = smallest(hmp_fleet, 3)
    task = fedmask_task(
        FLEET,
        hmp_fleet.num_classes,
        task_id="agent-crash",
        # A round closes on all three, or at its 3 s deadline with at least two (else it is extended).
        hyper={"min_updates": 2},
        rounds=3,
        quorum=3,
        deadline_s=3.0,
    )
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    tickets = TrainingTickets()
    aggregator = AggregatorService(open_mosquitto.url(), FLEET, task, store).start()
    agents = [_agent(open_mosquitto, d, tmp_path, tickets).start() for d in (first, second)]
    data_file = save_device(crashing, tmp_path / f"{crashing.device_id}.npz")
    command = [
        "agent", "run", "--broker", open_mosquitto.url(), "--fleet", FLEET, "--device-id",
        crashing.device_id, "--data", str(data_file), "--state-dir", str(tmp_path / "crashing"),
        "--threads", "1",
    ]  # fmt: skip
    state_file = tmp_path / "crashing" / f"{crashing.device_id}.npz"
    watcher = MqttProbe(open_mosquitto.host, open_mosquitto.port)
    try:
        process = fedmask_processes(command, log="agent-1.log")
        # Round 1: the crashing device answers; the two others wait for their tickets.
        poll(lambda: crashing.device_id in accepted_devices(store, task.task_id, 1), 90, "its round-1 update")
        poll(lambda: state_file.exists() and AgentState(state_file).last_round == 1, 10, "its state file")
        watcher.connect()
        watcher.subscribe(Topics(FLEET).state(crashing.device_id))

        process.kill()  # mid-round: round 1 is open, two devices still to answer

        def offline_will() -> bool:
            states = [m for m in watcher.messages if m.payload]
            last = messages.decode(bytes(states[-1].payload), messages.Presence) if states else None
            return last is not None and last.status == "offline"

        watcher.wait_until(offline_will, 10, "the last will")
        poll(lambda: presence(store, FLEET, crashing.device_id) == "offline", 10, "offline in the store")
        assert round_state(store, task.task_id, 1) == "open"

        with deadlines_held(aggregator):  # round 1 closes on quorum: the dead device's update counts
            tickets.grant(2)
            poll(lambda: round_state(store, task.task_id, 1) == "closed", 30, "round 1 closed")
        poll(lambda: round_state(store, task.task_id, 2) == "open", 10, "round 2 open")
        tickets.grant(2)  # round 2: only two devices alive, so the deadline closes it
        poll(lambda: round_state(store, task.task_id, 2) == "closed", 30, "round 2 closed")

        restarted = fedmask_processes(command, log="agent-2.log")
        poll(lambda: crashing.device_id in accepted_devices(store, task.task_id, 3), 90, "its round-3 update")
        restarted.wait_for_log(f"resuming task {task.task_id} after round 1", 10)
        assert presence(store, FLEET, crashing.device_id) == "online"
        with deadlines_held(aggregator):
            tickets.grant(2)
            poll(lambda: round_state(store, task.task_id, 3) == "closed", 30, "round 3 closed")
    finally:
        watcher.close()
        _stop(tickets, aggregator, *agents)

    rounds = {r.round_no: r for r in store.list_rounds(task_id=task.task_id)}
    assert (rounds[1].closed_by, rounds[1].participants) == ("quorum", 3)
    assert (rounds[2].closed_by, rounds[2].participants) == ("deadline", 2)
    assert (rounds[3].closed_by, rounds[3].participants) == ("quorum", 3)
    assert crashing.device_id not in accepted_devices(store, task.task_id, 2)
    caught_up = next(
        u for u in store.round_detail(task.task_id, 3).updates if u.device_id == crashing.device_id
    )
    assert (caught_up.base_round, caught_up.staleness, caught_up.weight) == (3, 0, 1.0)
    assert AgentState(state_file).last_round == 3
    # Every update decoded, the restarted agent's too (its masks coded against what it kept).
    assert all(r.rejections == 0 for r in store.list_rounds(task_id=task.task_id))
    assert {m.round_no for m in load_masks(store, task.task_id, crashing.device_id)} == {3}
    store.close()


def test_aggregator_killed_mid_round_loses_no_update_and_counts_none_twice(
    open_mosquitto: BrokerHandle,
    hmp_fleet: FederatedDataset,
    one_torch_thread: None,
    fedmask_processes,
    tmp_path: Path,
    db_url: str,  # SQLite and PostgreSQL, as in production
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fedmask")
    devices = smallest(hmp_fleet, 4)
    task_file = tmp_path / "task.yaml"
    task_file.write_text(
        yaml.safe_dump(
            {
                "task_id": "aggregator-crash",
                "strategy": "fedmask",
                "arch": "har_cnn",
                "num_classes": hmp_fleet.num_classes,
                # Only the quorum closes a round; 5 s is also how long a device waits for a receipt.
                "hyper": {"local_epochs": 1, "min_updates": 4, "finalize_deadline_s": 120},
                "schedule": {"rounds": 2, "quorum": 4, "deadline_s": 5},
            }
        )
    )
    command = ["aggregator", "run", "--broker", open_mosquitto.url(), "--fleet", FLEET]
    command += ["--task", str(task_file), "--db", db_url]
    task_id = "aggregator-crash"
    store = Store(db_url)
    store.upgrade()
    tickets = TrainingTickets()
    agents = [_agent(open_mosquitto, d, tmp_path, tickets).start() for d in devices]
    try:
        first = fedmask_processes(command, log="aggregator-1.log")
        first.wait_for_log("aggregator serving", 60)
        tickets.grant(2)
        poll(lambda: len(accepted_devices(store, task_id, 1)) == 2, 60, "two stored updates")
        before = {u.device_id: u.payload for u in store.accepted_updates(task_id, 1)}

        first.kill()  # mid-round: two updates stored and acknowledged, two devices still to answer

        tickets.grant(1)  # published while no aggregator is connected: the broker keeps it in the session
        poll(
            lambda: [a for a in agents if a.device_id not in before and a.state.last_round == 1],
            60,
            "an update published during the outage",
        )
        # No receipt within deadline_s: the device publishes the same bytes again (a second copy queued).
        poll(lambda: "no receipt for its update" in caplog.text, 30, "a republished update")

        second = fedmask_processes(command, log="aggregator-2.log")
        second.wait_for_log("aggregator serving", 60)
        assert "resumed round 1 with 2 stored updates" in second.log()
        tickets.grant(1)
        poll(lambda: round_state(store, task_id, 1) == "closed", 60, "round 1 closed")
        tickets.grant(len(devices) * 2)  # round 2 and the finalizations
        assert second.process.wait(120) == 0, second.log()[-3000:]
    finally:
        _stop(tickets, *agents)

    everyone = sorted(d.device_id for d in devices)
    for round_no in (1, 2):
        detail = store.round_detail(task_id, round_no)
        assert sorted(u.device_id for u in detail.updates) == everyone  # each (round, device) once
        assert detail.round.closed_by == "quorum"
        assert detail.aggregate is not None and detail.aggregate.num_updates == len(everyone)
    # The restarted aggregator judged what the broker had queued for it against the stored state.
    assert "rejected message" not in second.log()
    after = {u.device_id: u.payload for u in store.accepted_updates(task_id, 1)}
    assert {d: after[d] for d in before} == before  # the acknowledged updates survived the crash
    assert sorted(m.device_id for m in store.list_models(task_id=task_id)) == everyone
    # Round 2's updates were coded against round-1 masks the first aggregator stored: the second one
    # decoded them from its store (none was refused, see above), and holds round 2's now.
    # The bases were stored as references to the updates' payloads, as the ingest path writes them.
    for device in everyone:
        bases = load_masks(store, task_id, device)
        assert {(m.round_no, m.packed, m.payload is not None) for m in bases} == {(2, None, True)}
    assert all(a._last_update.body["mask"].context.prev is not None for a in agents)
    store.close()


def test_broker_restarted_mid_round_the_run_completes(
    open_mosquitto: BrokerHandle,
    hmp_fleet: FederatedDataset,
    one_torch_thread: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fedmask.protocol.transport")
    devices = smallest(hmp_fleet, 3)
    task = fedmask_task(
        FLEET,
        hmp_fleet.num_classes,
        task_id="broker-restart",
        hyper={"min_updates": 3},
        rounds=2,
        quorum=3,
        deadline_s=30.0,
    )
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    tickets = TrainingTickets()
    agents = [_agent(open_mosquitto, d, tmp_path, tickets).start() for d in devices]
    aggregator = AggregatorService(open_mosquitto.url(), FLEET, task, store).start()
    try:
        tickets.grant(1)
        poll(lambda: len(accepted_devices(store, task.task_id, 1)) == 1, 60, "the first update")

        open_mosquitto.restart()  # mid-round; persistence keeps sessions, queues and retained messages

        tickets.grant(len(devices) * 3)  # the rest of round 1, round 2 and the finalizations
        assert aggregator.wait(120), "the run did not complete after the broker restart"
    finally:
        _stop(tickets, aggregator, *agents)

    # Everyone came back to the session the broker kept (its queue of QoS 1 messages included).
    for client_id in (aggregator.connection.client_id, *(a.device_id for a in agents)):
        assert f"as {client_id} (MQTT 5, Success, session resumed)" in caplog.text, client_id
    everyone = sorted(d.device_id for d in devices)
    for summary in store.list_rounds(task_id=task.task_id):
        assert (summary.state, summary.closed_by, summary.participants) == ("closed", "quorum", 3)
    assert sorted(m.device_id for m in store.list_models(task_id=task.task_id)) == everyone
    assert all(a.finished.is_set() for a in agents)
    store.close()
