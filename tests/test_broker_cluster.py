"""A clustered broker, really run: RabbitMQ nodes of our own (MQTT plugin, MQTT 3.1.1 only).

1. Failover: a 2-node cluster, the aggregator and half the devices on node 0, the other half on node 1,
   each given both URLs. Node 0 is killed (SIGKILL) in the middle of round 2, while updates are in
   flight. Everyone fails over to node 1 (a new session there: RabbitMQ 3.x sessions are node-local),
   the aggregator announces the round again, devices republish what has no receipt yet, and the task
   completes with every update stored exactly once.
2. A broker that does not speak MQTT 5: both `fedmask aggregator run` and `fedmask agent run` end with
   one line naming `--mqtt-protocol 3.1.1`, and the aggregator opened no round.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures.rabbitmq import RabbitCluster, RabbitNode
from test_cli_errors import aggregator_and_agent, device_file, error_line, fedmask_together, task_file

from fedmask.aggregator.service import AggregatorService
from fedmask.aggregator.tasks import build_task
from fedmask.datasets.federated import DeviceData
from fedmask.device_agent.agent import DeviceAgent
from fedmask.storage import Store
from fedmask.strategies import TaskSpec

pytestmark = pytest.mark.broker
__all__ = ["device_file", "task_file"]  # the CLI tests' fixtures, used here too

FLEET = "cluster"
DEVICES = 6
ROUNDS = 3


class KillMidRound:
    """The agents' train lock: one training at a time; the one that would start the second half of
    round 2 first waits until the test killed the node (the first half's updates are then in flight)."""

    def __init__(self, pause_at: int) -> None:
        self._lock = threading.Lock()
        self.trainings = 0
        self.pause_at = pause_at
        self.paused = threading.Event()
        self.resume = threading.Event()

    def __enter__(self) -> KillMidRound:
        self._lock.acquire()
        self.trainings += 1
        if self.trainings == self.pause_at:
            self.paused.set()
            self.resume.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def tiny_device(index: int) -> DeviceData:
    rng = np.random.default_rng(index)
    x = rng.normal(size=(24, 3, 128)).astype(np.float32)
    y = rng.integers(0, 14, 24).astype(np.int64)
    return DeviceData(f"dev-{index}", x[:16], y[:16], x[16:], y[16:], num_classes=14)


def test_agents_and_aggregator_fail_over_with_no_update_lost(
    rabbitmq_cluster: RabbitCluster, tmp_path: Path, one_torch_thread: None
) -> None:
    node0, node1 = rabbitmq_cluster.nodes
    spec = TaskSpec(
        strategy="fedmask",
        arch="har_cnn",
        num_classes=14,
        seed=0,
        arch_kwargs={"width": 0.25},
        hyper={"local_epochs": 1, "batch_size": 16},
    )
    # Every device in every round, and a deadline far away: a lost update would stall the task.
    task = build_task(
        FLEET, spec, {"rounds": ROUNDS, "quorum": DEVICES, "deadline_s": 600.0}, task_id="cluster-failover"
    )
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    gate = KillMidRound(pause_at=DEVICES + DEVICES // 2 + 1)
    urls = [node0.url, node1.url]
    agents = [
        DeviceAgent(
            urls if i % 2 == 0 else urls[::-1],  # half start on node 0, half on node 1
            FLEET,
            f"dev-{i}",
            tiny_device(i),
            state_dir=tmp_path / "agents",
            protocol="3.1.1",
            train_lock=gate,
            latency_runs=1,
        )
        for i in range(DEVICES)
    ]
    aggregator = AggregatorService(urls, FLEET, task, store, protocol="3.1.1")
    try:
        for agent in agents:
            agent.start()
        aggregator.start()
        assert gate.paused.wait(60), "round 2 never got half way"
        rabbitmq_cluster.kill(0)
        gate.resume.set()
        assert aggregator.wait(90), f"task not complete after the failover: {aggregator.manager.outcome}"
    finally:
        gate.resume.set()
        aggregator.stop()
        for agent in agents:
            agent.stop()
    assert aggregator.manager.outcome == "complete"
    # Everyone on node 1 now, each in a new session there (client id <id>.1 for those that moved).
    assert aggregator.connection.broker.port == node1.mqtt_port
    assert aggregator.connection.session_id == "fedmask-aggregator-cluster.1"
    assert {a.connection.broker.port for a in agents} == {node1.mqtt_port}
    assert [a.error for a in agents] == [None] * DEVICES
    # 0 updates lost, none stored twice: exactly one row per device and round, and every result.
    for round_no in range(1, ROUNDS + 1):
        stored = sorted(u.device_id for u in store.accepted_updates(task.task_id, round_no))
        assert stored == sorted(a.device_id for a in agents), f"round {round_no}"
    assert {m.device_id for m in store.list_models(task_id=task.task_id)} == {a.device_id for a in agents}
    assert all(a.result_confirmed.is_set() for a in agents)
    store.close()


def test_a_broker_without_mqtt5_is_named_before_any_round(
    rabbitmq_node: RabbitNode, tmp_path: Path, task_file: Path, device_file: Path
) -> None:
    started = time.monotonic()
    commands = aggregator_and_agent(tmp_path, task_file, device_file, rabbitmq_node.url)
    for code, stderr in fedmask_together(*commands):
        assert code == 1
        line = error_line(stderr)
        assert "MQTT 5" in line and "--mqtt-protocol 3.1.1" in line, line
    assert time.monotonic() - started < 30
    with sqlite3.connect(tmp_path / "a.db") as db:
        assert db.execute("SELECT count(*) FROM rounds").fetchone() == (0,)
