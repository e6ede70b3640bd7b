"""The agent's faults of issue 10 over a real Mosquitto: `fedmask agent run` processes (killed, restarted,
misconfigured) and the aggregator service with a SQLite store. Each misconfiguration ends in one error
line and a non-zero exit within seconds; a kill ends in recovery.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fixtures.broker import BrokerHandle
from fixtures.fleet import fedmask_task, renamed, smallest

from fedmask.aggregator.service import AggregatorService
from fedmask.datasets.federated import FederatedDataset, save_device
from fedmask.device_agent.agent import AgentState, DeviceAgent
from fedmask.storage import Store

pytestmark = pytest.mark.broker

FLEET = "e2e-agent-faults"


def _command(broker_url: str, device_id: str, data: Path, state_dir: Path, *extra: str) -> list[str]:
    return [
        "agent", "run", "--broker", broker_url, "--fleet", FLEET, "--device-id", device_id,
        "--data", str(data), "--state-dir", str(state_dir), "--threads", "1", *extra,
    ]  # fmt: skip


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("fedmask agent run:")]


def test_an_agent_killed_while_uploading_its_result_resumes_finalization_after_a_restart(
    open_mosquitto: BrokerHandle,
    hmp_fleet: FederatedDataset,
    fedmask_processes,
    tmp_path: Path,
) -> None:
    """Fault 2: the finalize directive was consumed by the killed process; the state file records that
    finalization was requested, so the restarted agent finalizes from the retained last aggregate."""
    device = smallest(hmp_fleet, 1)[0]
    task = fedmask_task(
        FLEET,
        hmp_fleet.num_classes,
        task_id="killed-mid-result",
        hyper={"finalize_deadline_s": 300},
        rounds=1,
        quorum=1,
        deadline_s=60.0,
        max_payload=4096,  # the result travels as many frames: there is a middle to be killed in
    )
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    aggregator = AggregatorService(open_mosquitto.url(), FLEET, task, store).start()
    data = save_device(device, tmp_path / f"{device.device_id}.npz")
    command = _command(open_mosquitto.url(), device.device_id, data, tmp_path / "agent")
    try:
        killed = fedmask_processes(
            command, log="agent-1.log", env={"FEDMASK_KILL_AT": "agent.result.mid_chunk"}
        )
        assert killed.process.wait(120) == -9, killed.log()[-3000:]
        assert "fault injection: SIGKILL at agent.result.mid_chunk" in killed.log()
        state = AgentState(tmp_path / "agent" / f"{device.device_id}.npz")
        assert state.finalize_requested and not state.result_confirmed
        assert store.list_models(task_id=task.task_id) == []

        restarted = fedmask_processes(command, log="agent-2.log")
        assert restarted.process.wait(120) == 0, restarted.log()[-3000:]
        assert "finalization was requested before the restart" in restarted.log()
        assert aggregator.wait(30)
    finally:
        aggregator.stop()
    assert aggregator.manager.outcome == "complete"
    assert [m.device_id for m in store.list_models(task_id=task.task_id)] == [device.device_id]
    store.close()


def test_an_agent_without_torch_exits_with_one_error_line(
    open_mosquitto: BrokerHandle, hmp_fleet: FederatedDataset, fedmask_processes, tmp_path: Path
) -> None:
    """Fault 5: it used to log ModuleNotFoundError on every task message and stay connected forever."""
    no_torch = tmp_path / "no-torch" / "torch"
    no_torch.mkdir(parents=True)
    (no_torch / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n'
    )
    device = smallest(hmp_fleet, 1)[0]
    data = save_device(device, tmp_path / f"{device.device_id}.npz")
    # Without --threads, nothing imports torch before the agent joins a task.
    command = _command(open_mosquitto.url(), device.device_id, data, tmp_path / "agent")
    del command[command.index("--threads") : command.index("--threads") + 2]
    path = os.pathsep.join(p for p in (str(no_torch.parent), os.environ.get("PYTHONPATH")) if p)
    agent = fedmask_processes(command, log="agent.log", env={"PYTHONPATH": path})
    assert agent.process.wait(60) != 0
    errors = _error_lines(agent.log())
    assert len(errors) == 1 and "PyTorch is not installed" in errors[0], agent.log()[-2000:]


def test_an_agent_whose_device_id_is_not_its_identity_exits_with_one_error_line(
    mosquitto: BrokerHandle, hmp_fleet: FederatedDataset, fedmask_processes, tmp_path: Path
) -> None:
    """Fault 6, at start: the device id is checked against the device file and the credentials."""
    device = smallest(hmp_fleet, 1)[0]
    own_data = save_device(renamed(device, "dev-1"), tmp_path / "dev-1.npz")
    other_data = save_device(renamed(device, "dev-2"), tmp_path / "dev-2.npz")
    credentials = str(mosquitto.credentials_file("dev-1"))
    cases = {
        "credentials": _command(
            mosquitto.url(), "dev-2", other_data, tmp_path / "a", "--credentials-file", credentials
        ),
        "device file": _command(
            mosquitto.url(), "dev-1", other_data, tmp_path / "b", "--credentials-file", credentials
        ),
    }
    for case, command in cases.items():
        agent = fedmask_processes(command, log=f"{case.replace(' ', '-')}.log")
        assert agent.process.wait(60) != 0, case
        errors = _error_lines(agent.log())
        assert len(errors) == 1, (case, agent.log()[-2000:])
        assert (
            "credentials are for user 'dev-1'" if case == "credentials" else "holds the data of"
        ) in errors[0]
    assert own_data.exists()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_an_agent_whose_publishes_the_broker_refuses_stops_with_an_error(
    mosquitto: BrokerHandle, hmp_fleet: FederatedDataset, tmp_path: Path, protocol: str
) -> None:
    """Fault 6, at run time: logged in as dev-1 but speaking for dev-2, every publish is refused (MQTT 5
    0x87) or silently dropped (3.1.1). The agent reads its own presence back; without it, it stops."""
    device = smallest(hmp_fleet, 1)[0]
    agent = DeviceAgent(
        mosquitto.url("dev-1"),
        FLEET,
        "dev-2",
        device,
        state_dir=tmp_path / "agent",
        protocol=protocol,
        identity_timeout_s=3.0,
    )
    started = time.monotonic()
    try:
        agent.start()
        assert agent.finished.wait(15), "the agent ran on with a refused identity"
    finally:
        agent.stop()
    assert time.monotonic() - started < 15
    assert agent.error is not None and "did not deliver our own presence back" in agent.error
    assert not agent.identity_confirmed.is_set()


def test_an_agent_with_its_own_identity_reads_its_presence_back(
    mosquitto: BrokerHandle, hmp_fleet: FederatedDataset, tmp_path: Path
) -> None:
    """The contrast: under the same ACL the right identity is confirmed and nothing fails."""
    device = smallest(hmp_fleet, 1)[0]
    agent = DeviceAgent(
        mosquitto.url("dev-1"), FLEET, "dev-1", device, state_dir=tmp_path / "agent", identity_timeout_s=3.0
    )
    try:
        agent.start()
        assert agent.identity_confirmed.wait(10)
        time.sleep(3.5)  # past the identity deadline
        assert agent.error is None and not agent.finished.is_set()
    finally:
        agent.stop()
