"""End to end over a real Mosquitto: 8 device agents and the aggregator run 3 rounds of FedMask on real
HMP data, then finalize; the same seed in process must give the same masks.

One run (module fixture) answers every test here: it is the expensive part. Training is serialized
(one lock for all agents, as the in-process simulator runs devices one after another), so the run is
deterministic and the comparison with the in-process run is exact.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from fixtures.broker import MqttProbe
from fixtures.fleet import Delivered, WireObserver, delivered, fedmask_task, poll

from fedmask.aggregator.round_manager import unpack_body
from fedmask.aggregator.service import AggregatorService
from fedmask.broker_config.binaries import find_mosquitto
from fedmask.broker_config.embedded import EmbeddedBroker
from fedmask.datasets.federated import FederatedDataset
from fedmask.device_agent.agent import DeviceAgent, spec_from_task
from fedmask.protocol import messages
from fedmask.protocol.chunking import wire_size
from fedmask.protocol.topics import Topics, chunk_filter
from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.inproc import InProcessRun
from fedmask.storage import Store

pytestmark = pytest.mark.broker

FLEET = "e2e-fleet"
ROUNDS = 3
# Small enough that updates (78,048 mask bits, zlib-coded) and results travel as frames.
MAX_PAYLOAD = 2048


@dataclass
class FleetRun:
    task: messages.Task
    data: FederatedDataset
    store: Store
    agents: list[DeviceAgent]
    uplinks: list[Delivered]
    announcements: dict[int, messages.RoundAnnouncement]  # round -> what the broker delivered
    in_process: InProcessRun


def _collect(probe: MqttProbe) -> list[tuple[str, bytes]]:
    return [(m.topic, bytes(m.payload)) for m in list(probe.messages)]


@pytest.fixture(scope="module")
def fleet_run(
    hmp_fleet: FederatedDataset, tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None
) -> Iterator[FleetRun]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    tmp = tmp_path_factory.mktemp("fleet")
    devices = hmp_fleet.devices
    task = fedmask_task(
        FLEET,
        hmp_fleet.num_classes,
        task_id="e2e-fleet-fedmask",
        rounds=ROUNDS,
        quorum=len(devices),  # every device in every round, as in process
        deadline_s=600.0,
        max_payload=MAX_PAYLOAD,
    )
    topics = Topics(FLEET)
    store = Store(f"sqlite:///{tmp / 'fleet.db'}")
    store.upgrade()
    one_training_at_a_time = threading.Semaphore(1)
    with EmbeddedBroker(workdir=tmp / "broker", backend="mosquitto") as broker:
        uplink_probe = MqttProbe(broker.host, broker.port)
        uplink_probe.connect()
        uplink_probe.subscribe(topics.all_up)
        round_probe = MqttProbe(broker.host, broker.port)
        round_probe.connect()
        round_probe.subscribe(topics.round)
        round_probe.subscribe(chunk_filter(topics.round))
        agents = [
            DeviceAgent(
                broker.url,
                FLEET,
                d.device_id,
                d,
                state_dir=tmp / "agents",
                train_lock=one_training_at_a_time,
                latency_runs=5,
            )
            for d in devices
        ]
        aggregator = AggregatorService(broker.url, FLEET, task, store)
        try:
            for agent in agents:  # presence first: the aggregator knows the fleet when round 1 opens
                agent.start()
            aggregator.start()
            assert aggregator.wait(240), "the aggregator did not collect every personalized model"
            poll(lambda: all(a.finished.is_set() for a in agents), 30, "finished agents")
        finally:
            aggregator.stop()
            for agent in agents:
                agent.stop()
            received_up = _collect(uplink_probe)
            received_rounds = _collect(round_probe)
            uplink_probe.close()
            round_probe.close()
    announcements = {}
    observer = WireObserver()
    for whole in delivered(received_rounds, observer):
        assert isinstance(whole.message, messages.RoundAnnouncement)
        announcements[whole.message.round] = whole.message
    config = SimulationConfig(
        rounds=ROUNDS, seed=task.seed, fleet=FLEET, max_payload=MAX_PAYLOAD, eval_every=0, output_dir=tmp
    )
    in_process = InProcessRun(config, hmp_fleet, spec_from_task(task))
    in_process.run()
    uplinks = delivered(received_up, observer)
    yield FleetRun(task, hmp_fleet, store, agents, uplinks, announcements, in_process)
    store.close()


def test_every_round_closes_on_quorum_with_every_device(fleet_run: FleetRun) -> None:
    rounds = fleet_run.store.list_rounds(task_id=fleet_run.task.task_id)
    assert [r.round_no for r in rounds] == list(range(1, ROUNDS + 1))
    everyone = sorted(d.device_id for d in fleet_run.data.devices)
    for summary in rounds:
        assert (summary.state, summary.closed_by) == ("closed", "quorum")
        assert summary.rejections == 0
        detail = fleet_run.store.round_detail(fleet_run.task.task_id, summary.round_no)
        assert sorted(u.device_id for u in detail.updates) == everyone
        assert detail.aggregate is not None and detail.aggregate.num_updates == len(everyone)


def test_every_agent_gets_every_aggregate(fleet_run: FleetRun) -> None:
    task_id = fleet_run.task.task_id
    # What the broker delivered on the retained round topic: round r + 1 carries round r's aggregate,
    # and round ROUNDS + 1 the last one (devices finalize from it).
    assert sorted(fleet_run.announcements) == list(range(1, ROUNDS + 2))
    assert fleet_run.announcements[1].body is None
    for closed in range(1, ROUNDS + 1):
        stored = unpack_body(fleet_run.store.get_aggregate(task_id, closed))
        announced = fleet_run.announcements[closed + 1].body
        assert announced is not None and set(announced) == set(stored)
        for name in stored:
            np.testing.assert_array_equal(announced[name].array, stored[name].array)
    last = unpack_body(fleet_run.store.get_aggregate(task_id, ROUNDS))
    for agent in fleet_run.agents:
        assert set(agent.rounds_seen) == set(range(1, ROUNDS + 2)), agent.device_id
        assert agent.state.last_round == ROUNDS and agent.state.finalized
        assert agent.global_body is not None
        for name in last:
            np.testing.assert_array_equal(agent.global_body[name], last[name].array)


def test_personalized_accuracy_is_well_above_chance(fleet_run: FleetRun) -> None:
    models = fleet_run.store.list_models(task_id=fleet_run.task.task_id)
    assert sorted(m.device_id for m in models) == sorted(d.device_id for d in fleet_run.data.devices)
    chance = 1 / fleet_run.data.num_classes
    by_device = {d.device_id: d for d in fleet_run.data.devices}
    tested = sum(by_device[m.device_id].num_test for m in models)
    # The TFLite interpreter's accuracy on each device's own test windows (split by recording).
    mean = sum(m.accuracy * by_device[m.device_id].num_test for m in models) / tested
    assert mean > 4 * chance, f"sample-weighted accuracy {mean:.3f}, chance {chance:.3f}"
    assert all(m.accuracy > chance for m in models), [(m.device_id, m.accuracy) for m in models]


def test_update_bytes_on_the_wire_match_the_codec(fleet_run: FleetRun) -> None:
    task_id = fleet_run.task.task_id
    updates = [u for u in fleet_run.uplinks if isinstance(u.message, messages.Update)]
    assert len(updates) == ROUNDS * len(fleet_run.agents)  # each update crossed the broker once
    stored = {
        (s.device_id, r): s
        for r in range(1, ROUNDS + 1)
        for s in fleet_run.store.accepted_updates(task_id, r)
    }
    summaries = {
        (s.device_id, r): s
        for r in range(1, ROUNDS + 1)
        for s in fleet_run.store.round_detail(task_id, r).updates
    }
    for seen in updates:
        key = (seen.device, seen.message.round)
        # A mask travels coded against the device's previous upload and the consensus when that is
        # smaller; the store keeps the update in full coding (it decodes without any base).
        kept = messages.decode(stored[key].payload, messages.Update)
        for name, entry in seen.message.body.items():
            np.testing.assert_array_equal(kept.body[name].array, entry.array)
        contexts = [entry.context for entry in seen.message.body.values()]
        if any(context is not None for context in contexts):
            assert len(seen.payload) < len(stored[key].payload), key
        else:
            assert seen.payload == stored[key].payload, key
        assert seen.wire_bytes == wire_size(seen.payload, MAX_PAYLOAD)
        assert summaries[key].payload_bytes == len(stored[key].payload)
    # (Whether masks went coded against bases depends on FedMask's defaults: they do when that is
    # smaller; tests/test_e2e_mask_coding.py makes sure they do.)
    # Dense early masks compress into one payload; the others travel as frames, whose headers count.
    assert any(seen.frames > 1 for seen in updates)
    for agent in fleet_run.agents:  # everything the agent counted, updates and result, went through
        mine = [u for u in fleet_run.uplinks if u.device == agent.device_id]
        assert [type(u.message).__name__ for u in mine].count("Result") == 1
        assert agent.bytes_sent == sum(u.wire_bytes for u in mine)


def test_same_seed_gives_the_same_masks_as_in_process(fleet_run: FleetRun) -> None:
    finals = fleet_run.in_process.finals
    assert sorted(finals) == sorted(a.device_id for a in fleet_run.agents)
    models = {m.device_id: m for m in fleet_run.store.list_models(task_id=fleet_run.task.task_id)}
    for agent in fleet_run.agents:
        expected = finals[agent.device_id].mask
        np.testing.assert_array_equal(agent.client.model.get_mask(), expected)
        # ...and the mask the device sent in its result is that one, bit for bit.
        stored = fleet_run.store.export_model(agent.device_id, "mask", fleet_run.task.task_id)
        with np.load(io.BytesIO(stored), allow_pickle=False) as npz:
            np.testing.assert_array_equal(npz["mask"], expected)
        # Fine-tuning from the same mask on the same data is the same too.
        assert models[agent.device_id].metrics["torch_accuracy"] == pytest.approx(
            finals[agent.device_id].evaluation.accuracy, abs=0.0
        )


def test_devices_send_no_update_twice_and_get_a_receipt_for_each(fleet_run: FleetRun) -> None:
    for agent in fleet_run.agents:
        assert agent.receipts == ROUNDS + 1  # one per update, one for the result
        sent = [
            (u.message.round, u.message.base_round)
            for u in fleet_run.uplinks
            if u.device == agent.device_id and isinstance(u.message, messages.Update)
        ]
        assert sent == [(r, r) for r in range(1, ROUNDS + 1)]
