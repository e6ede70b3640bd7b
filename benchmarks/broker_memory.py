"""Broker memory per connected device: N idle device agents on a private Mosquitto and on a RabbitMQ
node of our own (MQTT plugin, MQTT 3.1.1), the broker's resident memory before and after.

Each agent is what a deployed device keeps open between rounds: one persistent session (QoS 1), its
four subscriptions (task, round and its chunks, its own downlink) plus its own state topic, and its
retained presence with a last will. Agents run in worker processes of 100
(`fedmask.simulator.agent_processes`). Reported: broker RSS with no client, with N agents, the
difference per agent, and the time to connect them all. RabbitMQ's RSS includes its Erlang VM, read
from the node's PID file; the node is started and removed by `tests/fixtures/rabbitmq.py`.

    flock /tmp/fedmask-bench.lock .venv/bin/python benchmarks/broker_memory.py --agents 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from table import print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.rabbitmq import RabbitCluster, rabbitmq_installed

from fedmask.broker_config.embedded import EmbeddedBroker
from fedmask.datasets.federated import DeviceData
from fedmask.simulator.agent_processes import AgentProcesses

FLEET = "bench-memory"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def devices(count: int) -> list[DeviceData]:
    x = np.zeros((2, 3, 128), np.float32)
    y = np.zeros(2, np.int64)
    return [DeviceData(f"mem-{i:05d}", x, y, x, y, num_classes=14) for i in range(count)]


def measure(name: str, url: str, pid: int, protocol: str, count: int, folder: Path) -> dict[str, Any]:
    time.sleep(2)  # let the broker settle after start
    idle = rss_mib(pid)
    fleet = AgentProcesses(url, FLEET, devices(count), state_dir=folder / name, protocol=protocol)
    started = time.perf_counter()
    fleet.start()
    connect_s = time.perf_counter() - started
    time.sleep(5)  # presences delivered, queues settled
    loaded = rss_mib(pid)
    fleet.stop()
    return {
        "broker": name,
        "agents": count,
        "idle_rss_mib": idle,
        "rss_mib": loaded,
        "kib_per_agent": (loaded - idle) * 1024 / count,
        "connect_s": connect_s,
    }


COLUMNS = [
    ("broker", "broker", "{}"),
    ("agents", "agents", "{}"),
    ("idle_rss_mib", "idle RSS MiB", "{:.1f}"),
    ("rss_mib", "RSS with agents MiB", "{:.1f}"),
    ("kib_per_agent", "KiB per agent", "{:.1f}"),
    ("connect_s", "all connected s", "{:.1f}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--no-rabbitmq", action="store_true", help="Mosquitto only")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_broker_memory.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmask-memory-") as tmp:
        folder = Path(tmp)
        with EmbeddedBroker(workdir=folder / "mosquitto", backend="mosquitto") as broker:
            pid = broker._runner.process.pid
            rows.append(measure("Mosquitto 2.0", broker.url, pid, "5", args.agents, folder))
        if not args.no_rabbitmq and rabbitmq_installed():
            with RabbitCluster(1) as cluster:
                node = cluster.nodes[0]
                pid = int(Path(node.env["RABBITMQ_PID_FILE"]).read_text().strip())
                rows.append(measure("RabbitMQ 3.10", node.url, pid, "3.1.1", args.agents, folder))
    print_table(f"Broker memory per idle device agent ({args.agents} agents)", rows, COLUMNS)
    report = {
        "benchmark": "broker_memory",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
