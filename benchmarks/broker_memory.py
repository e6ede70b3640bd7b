"""Broker memory per connected device: N idle device connections on a private Mosquitto and on a RabbitMQ
node of our own (MQTT plugin, MQTT 3.1.1), the broker's resident memory before and after.

Each client holds what a device agent keeps open on the broker between rounds: one persistent session
(QoS 1) with the agent's subscriptions (task, round and its chunks, its own downlink, its own state
topic), a last will and its retained presence. Plain `MqttConnection`s, 100 per worker process (no
torch: the measurement is the broker's, and cheap). Reported: broker RSS with no client, with N agents, the
difference per agent, and the time to connect them all. RabbitMQ's RSS includes its Erlang VM, read
from the node's PID file; the node is started and removed by `tests/fixtures/rabbitmq.py`.

    flock /tmp/fedmask-bench.lock .venv/bin/python benchmarks/broker_memory.py --agents 1000
    # RabbitMQ at --rabbitmq-agents (default: as many as --agents)
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from table import print_table, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.rabbitmq import RabbitCluster, rabbitmq_installed

from fedmask.broker_config.embedded import EmbeddedBroker
from fedmask.protocol import messages
from fedmask.protocol.topics import Topics
from fedmask.protocol.transport import MqttConnection, Will

FLEET = "bench-memory"
# RabbitMQ 3.10 answers a CONNECT slowly under load (~22 Erlang processes and a queue per session):
# at 1,000 clients connecting from 10 processes some waited more than 10 s on this machine.
CONNECT_TIMEOUT_S = 120.0
PER_PROCESS = 100  # paho's select() loop: well under 1,024 descriptors per process


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hold(url: str, protocol: str, device_ids: list[str], pipe) -> None:
    """A worker process: connect ``device_ids`` as device agents do, then wait for "stop"."""
    topics = Topics(FLEET)
    connections = []
    for device in device_ids:
        offline = messages.Presence(fleet=FLEET, device=device, status="offline", at=time.time())
        connection = MqttConnection(
            url, device, protocol=protocol, will=Will(topics.state(device), messages.encode(offline))
        )
        for topic_filter in [*topics.device_filters(device), topics.state(device)]:
            connection.subscribe(topic_filter, lambda message: None)
        connection.connect(timeout_s=CONNECT_TIMEOUT_S)
        online = messages.Presence(fleet=FLEET, device=device, status="online", at=time.time())
        connection.publish(topics.state(device), messages.encode(online), retain=True)
        connections.append(connection)
    pipe.send("started")
    pipe.recv()
    for connection in connections:
        connection.close()
    pipe.send("stopped")


def measure(name: str, url: str, pid: int, protocol: str, count: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    time.sleep(2)  # let the broker settle after start
    idle = rss_mib(pid)
    ids = [f"mem-{i:05d}" for i in range(count)]
    workers = []
    started = time.perf_counter()
    for group in range(0, count, PER_PROCESS):
        parent, child = context.Pipe()
        process = context.Process(target=hold, args=(url, protocol, ids[group : group + PER_PROCESS], child))
        process.start()
        workers.append((process, parent))
    for _, pipe in workers:
        if not pipe.poll(600) or pipe.recv() != "started":
            raise RuntimeError(f"{name}: a worker did not connect its clients")
    connect_s = time.perf_counter() - started
    time.sleep(5)  # presences delivered, queues settled
    loaded = rss_mib(pid)
    for process, pipe in workers:
        pipe.send("stop")
        pipe.poll(60)
        process.join(10)
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
    ("kib_per_agent", "KiB per device", "{:.1f}"),
    ("connect_s", "all connected s", "{:.1f}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--no-rabbitmq", action="store_true", help="Mosquitto only")
    parser.add_argument(
        "--rabbitmq-agents", type=int, default=None, help="clients on the RabbitMQ node (default: --agents)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_broker_memory.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmask-memory-") as tmp:
        folder = Path(tmp)
        with EmbeddedBroker(workdir=folder / "mosquitto", backend="mosquitto") as broker:
            pid = broker._runner.process.pid
            rows.append(measure("Mosquitto 2.0", broker.url, pid, "5", args.agents))
        if not args.no_rabbitmq and rabbitmq_installed():
            with RabbitCluster(1) as cluster:
                node = cluster.nodes[0]
                pid = int(Path(node.env["RABBITMQ_PID_FILE"]).read_text().strip())
                rows.append(
                    measure("RabbitMQ 3.10", node.url, pid, "3.1.1", args.rabbitmq_agents or args.agents)
                )
    print_table("Broker memory per idle device connection", rows, COLUMNS)
    write_report(args.out, "broker_memory", argv, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
