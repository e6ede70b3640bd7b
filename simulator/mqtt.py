"""The MQTT transport: a private broker, the aggregator service and one agent per device, for real.

Every agent is its own MQTT client with its own identity and session; they run in worker processes of
~100 agents each (``agent_processes``, see ``agent_processes.py``: as devices are separate machines,
and one process cannot hold more than ~250 paho clients), and a cross-process semaphore keeps at most
``train_workers`` trainings running at once. The aggregator (this process) stores everything in a
SQLite file in the output directory, and the run's numbers are read back from that store and from the
bytes the agents really published.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.results import DeviceResult, MethodResult, RoundRecord
from fedmask.strategies import TaskSpec

logger = logging.getLogger(__name__)


class MqttRun:
    def __init__(
        self,
        config: SimulationConfig,
        data,
        spec: TaskSpec,
        *,
        train_workers: int | None = None,
        agent_processes: int | None = None,
    ) -> None:
        self.config = config
        self.data = data
        self.spec = spec
        self.train_workers = train_workers or max(1, (os.cpu_count() or 2) // 2)
        self.agent_processes = agent_processes or getattr(config, "agent_processes", None)
        self.db_url = f"sqlite:///{Path(config.output_dir).resolve() / f'fedmask-{spec.strategy}.db'}"

    def run(self, progress=None, timeout_s: float = 3600.0) -> MethodResult:
        import torch

        from fedmask.aggregator.service import AggregatorService
        from fedmask.aggregator.tasks import build_task
        from fedmask.broker_config.embedded import EmbeddedBroker
        from fedmask.simulator.agent_processes import AgentProcesses
        from fedmask.storage import Store

        cfg = self.config
        devices = self.data.devices
        quorum = min(cfg.devices_per_round or len(devices), len(devices))
        schedule = {
            "rounds": cfg.rounds,
            "quorum": quorum,
            "deadline_s": 600.0,
            "staleness_bound": 2,
            "max_payload": cfg.max_payload,
        }
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        db_file = Path(self.db_url.removeprefix("sqlite:///"))
        for stale in (
            db_file,
            db_file.with_name(db_file.name + "-wal"),
            db_file.with_name(db_file.name + "-shm"),
        ):
            stale.unlink(missing_ok=True)
        started = time.perf_counter()
        task = build_task(
            cfg.fleet, self.spec, schedule, task_id=f"{cfg.fleet}-{self.spec.strategy}-{self.spec.seed}"
        )
        store = Store(self.db_url)
        store.upgrade()
        state_dir = Path(cfg.output_dir) / f"agents-{self.spec.strategy}"
        for old in state_dir.glob("*.npz"):
            old.unlink()
        with EmbeddedBroker() as broker, _quiet_fleet():
            protocol = "5" if 5 in broker.protocol_versions else "3.1.1"
            aggregator = AggregatorService(broker.url, cfg.fleet, task, store, protocol=protocol)
            fleet = AgentProcesses(
                broker.url,
                cfg.fleet,
                devices,
                state_dir=state_dir,
                protocol=protocol,
                processes=self.agent_processes,
                train_workers=self.train_workers,
                torch_threads=torch.get_num_threads(),  # the same arithmetic as in process
            )
            agents = []
            try:
                fleet.start()  # presence first, so the aggregator knows every device
                aggregator.start()
                self._wait(aggregator, store, task.task_id, progress, timeout_s)
            finally:
                aggregator.stop()
                agents = fleet.stop() if fleet.started else []
                fleet.terminate()
        result = self._collect(store, task, agents, aggregator)
        result.wall_s = time.perf_counter() - started
        store.close()
        return result

    def _wait(self, aggregator, store, task_id: str, progress, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        reported = 0
        while not aggregator.wait(0.5):
            closed = sum(1 for r in store.list_rounds(task_id=task_id) if r.state == "closed")
            while progress and reported < min(closed, self.config.rounds):
                reported += 1
                progress(self.spec.strategy, reported, self.config.rounds, {})
            if time.monotonic() > deadline:
                raise TimeoutError(f"MQTT run did not finish within {timeout_s:.0f}s")
        while progress and reported < self.config.rounds:
            reported += 1
            progress(self.spec.strategy, reported, self.config.rounds, {})

    def _collect(self, store, task, agents, aggregator) -> MethodResult:
        from fedmask.protocol import messages
        from fedmask.protocol.chunking import wire_size
        from fedmask.simulator.inproc import params_per_update
        from fedmask.strategies import get_strategy

        server = get_strategy(self.spec.strategy).server(self.spec)
        result = MethodResult(strategy=self.spec.strategy, params_per_update=params_per_update(server))
        for summary in store.list_rounds(task_id=task.task_id):
            updates = store.accepted_updates(task.task_id, summary.round_no)
            # What crossed the broker: the store keeps updates in full coding, the aggregator counted
            # the coded bytes it received (masks coded against bases) and the announcements it sent.
            uplink = sum(
                aggregator.update_wire_bytes.get(
                    (u.device_id, summary.round_no), wire_size(u.payload, task.schedule.max_payload)
                )
                for u in updates
            )
            previous = (
                store.get_aggregate(task.task_id, summary.round_no - 1) if summary.round_no > 1 else None
            )
            announcement = messages.RoundAnnouncement(
                fleet=task.fleet,
                task_id=task.task_id,
                round=summary.round_no,
                deadline=0.0,
                body=None if previous is None else _unpack(previous),
            )
            tested = [u for u in updates if "test_accuracy" in u.metrics]
            weights = sum(u.metrics.get("num_test", 0) for u in tested)
            result.rounds.append(
                RoundRecord(
                    round=summary.round_no,
                    participants=sorted(u.device_id for u in updates),
                    uplink_bytes=uplink,
                    downlink_bytes=aggregator.announcement_wire_bytes.get(
                        summary.round_no, wire_size(announcement, task.schedule.max_payload)
                    )
                    * len(updates)
                    + aggregator.copy_wire_bytes.get(summary.round_no, 0),
                    train_loss=_mean([u.metrics.get("loss") for u in updates]),
                    density=_mean([u.metrics.get("density") for u in updates]),
                    # Participants' personalized test accuracy after their local training, sample-weighted.
                    accuracy_mean=(
                        sum(u.metrics["test_accuracy"] * u.metrics.get("num_test", 0) for u in tested)
                        / weights
                        if weights
                        else None
                    ),
                )
            )
        by_device = {d.device_id: d for d in self.data.devices}
        for model in store.list_models(task_id=task.task_id):
            result.devices.append(
                DeviceResult(
                    device_id=model.device_id,
                    accuracy=model.accuracy,
                    num_test=by_device[model.device_id].num_test,
                    metrics=dict(model.metrics or {}),
                )
            )
        result.extra["bytes_published_by_agents"] = sum(a.bytes_sent for a in agents)
        return result


@contextlib.contextmanager
def _quiet_fleet():
    """The simulated fleet's per-agent INFO chatter (connects, every update, every receipt) hidden
    unless the run is at DEBUG: the progress bar shows progress; warnings and errors still show."""
    names = ("fedmask.device_agent", "fedmask.aggregator", "fedmask.protocol", "fedmask.broker_config")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _unpack(data: bytes):
    from fedmask.aggregator.round_manager import unpack_body

    return unpack_body(data)


def _mean(values):
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None
