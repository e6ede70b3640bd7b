"""End to end over a real Mosquitto: masks coded against bases, and the fallback when the aggregator
has lost a device's base (a crash between committing an update and its base, a store restored from
an older backup): the update is refused with the reason, and the agent sends it again in full coding."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from fixtures.broker import BrokerHandle
from fixtures.fleet import TrainingTickets, accepted_devices, fedmask_task, poll, round_state, smallest
from sqlalchemy import delete, select

from fedmask.aggregator.service import AggregatorService
from fedmask.datasets.federated import FederatedDataset
from fedmask.device_agent.agent import DeviceAgent
from fedmask.protocol import messages
from fedmask.storage import Store
from fedmask.storage.mask_bases import load_masks
from fedmask.storage.schema import MaskBase
from fedmask.storage.schema import Rejection as RejectionRow

pytestmark = pytest.mark.broker

FLEET = "e2e-mask-coding"


def test_a_lost_base_is_refused_and_the_update_resent_in_full(
    open_mosquitto: BrokerHandle, hmp_fleet: FederatedDataset, one_torch_thread: None, tmp_path: Path
) -> None:
    devices = smallest(hmp_fleet, 2)
    task = fedmask_task(
        FLEET,
        hmp_fleet.num_classes,
        task_id="lost-base",
        rounds=3,
        quorum=2,
        deadline_s=600.0,
        hyper={"sparsity_lambda": 0.05, "lr": 1.0, "local_epochs": 2},  # masks that change each round
    )
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    tickets = TrainingTickets()
    aggregator = AggregatorService(open_mosquitto.url(), FLEET, task, store).start()
    agents = [
        DeviceAgent(
            open_mosquitto.url(), FLEET, d.device_id, d, state_dir=tmp_path / "agents", train_lock=tickets,
            latency_runs=5, receipt_timeout_s=60.0,
        ).start()
        for d in devices
    ]  # fmt: skip
    everyone = sorted(d.device_id for d in devices)
    try:
        for round_no in (1, 2):
            tickets.grant(2)
            poll(lambda r=round_no: round_state(store, task.task_id, r) == "closed", 60, f"round {round_no}")
        for agent in agents:  # round 2's uploads went coded against round 1's
            poll(lambda a=agent: a.bases.accepted and a.bases.accepted["mask"].round == 2, 10, "receipts")
            assert agent._last_update.body["mask"].context.prev.round == 1
            assert msgpack.unpackb(messages.encode(agent._last_update))["body"]["mask"]["c"] == "mctx"
        # The aggregator loses every device's base.
        with store.engine.begin() as connection:
            connection.execute(delete(MaskBase))
        aggregator.bases.forget()
        tickets.grant(2)
        poll(lambda: round_state(store, task.task_id, 3) == "closed", 60, "round 3 closed")
        assert sorted(accepted_devices(store, task.task_id, 3)) == everyone
    finally:
        tickets.shut()
        aggregator.stop()
        for agent in agents:
            agent.stop()
    with store.engine.connect() as connection:
        refused = list(connection.execute(select(RejectionRow.device_id, RejectionRow.reason)))
    assert sorted(refused) == [(d, "missing_base") for d in everyone]
    for agent in agents:
        # The update that was resent is the same update in full coding, and it was accepted.
        last = agent._last_update
        assert last.round == 3 and last.body["mask"].context is None
        stored = next(u for u in store.accepted_updates(task.task_id, 3) if u.device_id == agent.device_id)
        assert stored.payload == messages.encode(last)
        assert msgpack.unpackb(stored.payload)["body"]["mask"]["c"] == "bits"
        assert {m.round_no for m in load_masks(store, task.task_id, agent.device_id)} == {3}
    store.close()


def test_a_device_that_lost_its_state_file_gets_its_own_copy_of_the_announcement(
    open_mosquitto: BrokerHandle, hmp_fleet: FederatedDataset, one_torch_thread: None, tmp_path: Path
) -> None:
    devices = smallest(hmp_fleet, 2)
    task = fedmask_task(
        FLEET, hmp_fleet.num_classes, task_id="lost-state", rounds=3, quorum=2, deadline_s=600.0,
        hyper={"sparsity_lambda": 0.05, "lr": 1.0, "local_epochs": 2},
    )  # fmt: skip
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    tickets = TrainingTickets()
    aggregator = AggregatorService(open_mosquitto.url(), FLEET, task, store).start()

    def agent(device) -> DeviceAgent:
        return DeviceAgent(
            open_mosquitto.url(), FLEET, device.device_id, device, state_dir=tmp_path / "agents",
            train_lock=tickets, latency_runs=5,
        ).start()  # fmt: skip

    agents = [agent(d) for d in devices]
    try:
        for round_no in (1, 2):
            tickets.grant(2)
            poll(lambda r=round_no: round_state(store, task.task_id, r) == "closed", 60, f"round {round_no}")
        # The retained announcement of round 3 is coded against round 2's.
        poll(lambda: 3 in aggregator.bases.coded_rounds, 10, "a coded announcement")
        lost = agents.pop()
        lost.stop()
        lost.state.path.unlink()  # restarted without its state file: it holds no consensus
        agents.append(agent(devices[-1]))
        poll(lambda: aggregator.copy_wire_bytes.get(3), 10, "its own copy of round 3")
        tickets.grant(3)  # the stopped agent's worker was already waiting to train round 3: one for it
        poll(lambda: round_state(store, task.task_id, 3) == "closed", 60, "round 3 closed")
        assert sorted(accepted_devices(store, task.task_id, 3)) == sorted(d.device_id for d in devices)
        assert 3 in agents[-1].rounds_seen
        # ...and from then on it follows: the final announcement (coded against round 3's) decodes.
        poll(lambda: agents[-1].bases.consensus_ref.round == 4, 10, "the final announcement decoded")
    finally:
        tickets.shut()
        aggregator.stop()
        for a in agents:
            a.stop()
    store.close()
