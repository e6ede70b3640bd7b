"""`fedmask agent run --serve` as a service: one agent process takes two tasks in a row over a real
Mosquitto, keeps each model in its state directory, and stops cleanly on SIGTERM; `fedmask tasks`
reports both tasks done."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from fixtures.broker import BrokerHandle
from fixtures.fleet import fedmask_task, poll, smallest

from fedmask.aggregator.service import AggregatorService
from fedmask.cli import main
from fedmask.datasets.federated import FederatedDataset, save_device
from fedmask.device_agent import local_model
from fedmask.device_agent.agent import AgentState
from fedmask.storage import Store

pytestmark = pytest.mark.broker

FLEET = "service"


def test_a_serving_agent_takes_the_next_task_and_stops_on_sigterm(
    open_mosquitto: BrokerHandle,
    hmp_fleet: FederatedDataset,
    fedmask_processes,
    tmp_path: Path,
    capsys,
) -> None:
    device, latecomer = smallest(hmp_fleet, 2)
    data_file = save_device(device, tmp_path / f"{device.device_id}.npz")
    db = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(db)
    store.upgrade()
    state_dir = tmp_path / "state"
    agent = fedmask_processes(
        [
            "agent", "run", "--serve", "--broker", open_mosquitto.url(), "--fleet", FLEET,
            "--device-id", device.device_id, "--data", str(data_file), "--state-dir", str(state_dir),
            "--threads", "1", "--log-level", "INFO",
        ],
        log="agent.log",
    )  # fmt: skip
    try:
        for seed, task_id in enumerate(("first", "second")):
            # The second task asks its participants to finalize within 15 s: the latecomer below waits
            # that long (and 10 s more) before it gives that task up.
            hyper = {"finalize_deadline_s": 15.0} if task_id == "second" else {}
            task = fedmask_task(
                FLEET, hmp_fleet.num_classes, task_id=task_id, seed=seed, hyper=hyper, rounds=1, quorum=1
            )
            aggregator = AggregatorService(open_mosquitto.url(), FLEET, task, store).start()
            try:
                assert aggregator.wait(120), f"task {task_id} did not complete:\n{agent.log()[-3000:]}"
            finally:
                aggregator.stop()
            assert aggregator.manager.outcome == "complete"
            agent.wait_for_log(f"joined task {task_id}", 5)
            assert agent.running, agent.log()[-3000:]  # a one-shot agent would have exited here
        # The result is confirmed after the aggregator stored it: the receipt may still be on its way.
        poll(lambda: agent.log().count("confirmed our personalized model") == 2, 30, "the second receipt")

        # A device that comes up after the run ended finds the retained task, is never asked to
        # finalize, gives that task up at its deadline and keeps serving (no exit, no restart loop).
        late_file = save_device(latecomer, tmp_path / f"{latecomer.device_id}.npz")
        late = fedmask_processes(
            [
                "agent", "run", "--serve", "--broker", open_mosquitto.url(), "--fleet", FLEET,
                "--device-id", latecomer.device_id, "--data", str(late_file),
                "--state-dir", str(tmp_path / "late"), "--threads", "1", "--log-level", "INFO",
            ],
            log="late.log",
        )  # fmt: skip
        late.wait_for_log("giving up task second", 60)
        late.wait_for_log("waiting for the next task", 1)
        assert late.running

        for process in (agent, late):
            process.process.send_signal(signal.SIGTERM)
            assert process.process.wait(15) == 0, process.log()[-3000:]
    finally:
        store.close()
    assert "Traceback" not in agent.log() + late.log()
    state = AgentState(state_dir / f"{device.device_id}.npz")
    assert (state.task_id, state.result_confirmed) == ("second", True)
    for task_id in ("first", "second"):
        kept = local_model.find(state_dir, device.device_id, task_id)
        assert kept.path.read_bytes()[4:8] == b"TFL3"
        assert kept.label_names == hmp_fleet.meta["activities"]
        assert 0 < kept.info["metrics"]["num_test"] == len(device.y_test)
    assert local_model.find(state_dir).info["task_id"] == "second"  # the newest, by default

    assert main(["tasks", "--json", "--db", db]) == 0
    tasks = {t["task_id"]: t for t in json.loads(capsys.readouterr().out)}
    assert {
        t: (s["state"], s["rounds_closed"], s["rounds_total"], s["missing"]) for t, s in tasks.items()
    } == {
        "first": ("done", 1, 1, []),
        "second": ("done", 1, 1, []),
    }
    assert main(["models", "history", device.device_id, "--json", "--db", db]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [(m["task_id"], m["version"], m["num_test"]) for m in history] == [
        ("first", 1, len(device.y_test)),
        ("second", 1, len(device.y_test)),
    ]
    assert all(0 < m["density"] < 1 for m in history)
