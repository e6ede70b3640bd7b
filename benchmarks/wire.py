"""Wire benchmark: FedMask rounds over a real Mosquitto, and how fast the aggregator ingests updates.

1. Rounds. N device agents (each its own MQTT client and session, in worker processes of ~100 agents
   as `fedmask simulate --transport mqtt` runs them; one training at a time over all processes) and
   the aggregator (this process, SQLite store) run R rounds with quorum N. The model is tiny
   (har_cnn at width 0.25: 5,304 mask bits) and each device holds 16 synthetic windows, so training
   does not hide the wire. Reported per round:
   the wall time from one round's announcement to the next, and where it goes: train, encode and
   publish (per device; training runs one device at a time), ingest (aggregator, per update: decode,
   checks, commit, ack, receipt), aggregate and announce. Round 1, where devices join the task, is
   not measured. Also reported: the resident memory (RSS) of the aggregator's process (this one:
   Python, torch, the service and its store; at the end, and its growth over the run) and of the broker.
   Baseline, same run: the in-process simulator (`InProcessRun`) on the same fleet: same training,
   same encoding, no broker and no store (`--no-baseline` skips it).
2. Ingest. U devices each send one precomputed FedMask update of the HMP CNN (har_cnn, 78,048 mask
   bits at density 0.5, ~9.8 KB) from P publisher connections as fast as the broker takes them. Rate
   = updates stored, acknowledged and answered with a receipt per second (a subscriber counts the
   receipts, which the aggregator sends after commit and ack). SQLite, synchronous=FULL. Baseline,
   same run: `Store.record_update` of the same payloads directly (no MQTT, no decoding).

Prints a table, writes JSON. Times are medians (rounds: over devices x rounds; ingest: over repeats).

`--nagle` measures the sockets as paho leaves them (Nagle's algorithm on), the baseline for the
transport's TCP_NODELAY.
paho-mqtt leaves Nagle's algorithm on, so a small packet written right behind another one (the
aggregator's PUBACK, then its receipt) waits for the broker's delayed TCP ACK, ~40 ms on Linux.

    .venv/bin/python benchmarks/wire.py                  # 10, 50, 100 agents; 3 x 300 updates
    .venv/bin/python benchmarks/wire.py --quick          # 10 agents; 1 x 100 updates
    .venv/bin/python benchmarks/wire.py --nagle --out runs/bench_wire_nagle.json
    flock /tmp/fedmask-bench.lock .venv/bin/python benchmarks/wire.py --agents 100 500 1000 \
        --rounds 2 --no-ingest --out runs/bench_wire_fleet.json   # the fleet-size sweep
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from table import print_table, write_report

from fedmask.aggregator.service import AggregatorService
from fedmask.aggregator.tasks import build_task
from fedmask.broker_config.embedded import EmbeddedBroker
from fedmask.datasets.federated import DeviceData, FederatedDataset
from fedmask.device_agent.agent import spec_from_task
from fedmask.protocol import messages, transport
from fedmask.protocol.chunking import wire_size
from fedmask.protocol.tensor_codec import Coded
from fedmask.protocol.topics import Topics
from fedmask.protocol.transport import MqttConnection, ReceivedMessage
from fedmask.simulator.agent_processes import AgentProcesses
from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.inproc import InProcessRun
from fedmask.storage import Store
from fedmask.strategies import TaskSpec

FLEET = "bench-wire"
NUM_CLASSES = 14
WINDOW = (3, 128)  # one HMP accelerometer window


# -- helpers -------------------------------------------------------------------------------------------


def wait_for(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        time.sleep(0.02)


def settle(counter, quiet_s: float = 0.5, timeout: float = 30.0) -> None:
    """Wait until ``counter()`` stops changing for ``quiet_s`` (in-flight messages handled)."""
    deadline = time.monotonic() + timeout
    last, since = counter(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.05)
        if (now := counter()) != last:
            last, since = now, time.monotonic()


def rss_mib(pid: int | str = "self", peak: bool = False) -> float:
    """Resident memory of a process (``peak``: its high-water mark), from /proc."""
    field = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3 if seconds else float("nan")


def temporary_store(folder: Path) -> Store:
    store = Store(f"sqlite:///{folder / 'bench.db'}")
    store.upgrade()
    return store


# -- 1. rounds -----------------------------------------------------------------------------------------


def synthetic_fleet(agents: int, seed: int = 0) -> FederatedDataset:
    """``agents`` devices with 16 train and 8 test windows of noise each: cheap to train, real shapes."""
    rng = np.random.default_rng(seed)

    def windows(count: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(count, *WINDOW)).astype(np.float32)
        return x, rng.integers(0, NUM_CLASSES, count).astype(np.int64)

    devices = []
    for index in range(agents):
        (x_train, y_train), (x_test, y_test) = windows(16), windows(8)
        devices.append(
            DeviceData(f"bench-{index:03d}", x_train, y_train, x_test, y_test, num_classes=NUM_CLASSES)
        )
    return FederatedDataset("synthetic", "iid", NUM_CLASSES, WINDOW, np.float32, devices)


def tiny_task(agents: int, rounds: int) -> messages.Task:
    spec = TaskSpec(
        strategy="fedmask",
        arch="har_cnn",
        num_classes=NUM_CLASSES,
        seed=0,
        arch_kwargs={"width": 0.25},
        hyper={"local_epochs": 1, "batch_size": 16},
    )
    # Round 1 (devices join: build the model, check the digest) is not measured, and the last measured
    # round's wall time ends when the next one opens: two rounds more than measured.
    schedule = {"rounds": rounds + 2, "quorum": agents, "deadline_s": 600.0}
    return build_task(FLEET, spec, schedule, task_id=f"bench-rounds-{agents}")


def mqtt_rounds(
    data: FederatedDataset, task: messages.Task, rounds: int, processes: int | None
) -> dict[str, Any]:
    """Run ``rounds`` rounds over a private Mosquitto; the phase medians and the round wall times."""
    with tempfile.TemporaryDirectory(prefix="fedmask-wire-") as folder:
        store = temporary_store(Path(folder))
        with EmbeddedBroker(workdir=Path(folder) / "broker", backend="mosquitto") as broker:
            fleet = AgentProcesses(
                broker.url, FLEET, data.devices, state_dir=Path(folder) / "agents", processes=processes,
                torch_threads=1,
            )  # fmt: skip
            aggregator = AggregatorService(broker.url, FLEET, task, store)
            rss_before = rss_mib()
            agents = []
            try:
                started = time.perf_counter()
                fleet.start()
                start_s = time.perf_counter() - started
                aggregator.start()
                timings = aggregator.manager.timings
                wait_for(lambda: rounds + 2 in timings, 60 + 10 * len(data.devices), f"{rounds} rounds")
                rss = {"aggregator_rss_mib": rss_mib(), "broker_rss_mib": rss_mib(broker._runner.process.pid)}
            finally:
                fleet.gate.close()  # no training after the measurement: nothing left in flight
                settle(lambda: len(aggregator.ingest_s))
                if fleet.started:
                    agents = fleet.stop()
                fleet.terminate()
                aggregator.stop()
        measured = range(2, rounds + 2)
        per_device = [a.timings[r] for a in agents for r in measured]
        update_bytes = [
            wire_size(u.payload, task.schedule.max_payload)
            for r in measured
            for u in store.accepted_updates(task.task_id, r)
        ]
        store.close()
    return {
        "round_s": [timings[r + 1].opened - timings[r].opened for r in measured],
        "agent_processes": fleet.processes,
        "agents_start_s": start_s,
        **rss,
        "aggregator_rss_growth_mib": rss["aggregator_rss_mib"] - rss_before,
        "train_ms": median_ms([t.train_s for t in per_device]),
        "encode_ms": median_ms([t.encode_s for t in per_device]),
        "publish_ms": median_ms([t.publish_s for t in per_device]),
        "ingest_ms": median_ms(aggregator.ingest_s),
        "aggregate_ms": median_ms([timings[r].aggregate_s for r in measured]),
        # Announcements of rounds 2.. carry an aggregate; the first carries nothing.
        "announce_ms": median_ms(aggregator.announce_s[1:]),
        "update_bytes": int(statistics.median(update_bytes)),
    }


def in_process_rounds(data: FederatedDataset, task: messages.Task, rounds: int) -> list[float]:
    """Baseline: the same rounds in one process (same halves, same encoding; no broker, no store)."""
    with tempfile.TemporaryDirectory(prefix="fedmask-wire-") as folder:
        config = SimulationConfig(rounds=rounds + 1, fleet=FLEET, output_dir=Path(folder), eval_every=1)
        result = InProcessRun(config, data, spec_from_task(task)).run()
    return [record.wall_s for record in result.rounds[1:]]  # round 1 not measured, as over MQTT


def warm_up() -> None:
    """Train once before measuring: torch's first backward pass in a process costs seconds."""
    data = synthetic_fleet(1)
    spec = spec_from_task(tiny_task(1, 1))
    from fedmask.strategies import get_strategy

    get_strategy(spec.strategy).client(spec, data.devices[0]).fit(None, 1)


def round_row(agents: int, rounds: int, processes: int | None, baseline: bool) -> dict[str, Any]:
    data = synthetic_fleet(agents)
    task = tiny_task(agents, rounds)
    mqtt = mqtt_rounds(data, task, rounds, processes)
    round_s = statistics.median(mqtt.pop("round_s"))
    row = {"agents": agents, "rounds": rounds, "round_s": round_s, **mqtt}
    if baseline:
        baseline_s = statistics.median(in_process_rounds(data, task, rounds))
        row.update(inproc_round_s=baseline_s, x_inproc=round_s / baseline_s)
    return row


# -- 2. ingest -----------------------------------------------------------------------------------------


def hmp_cnn_task(updates: int, repeat: int) -> messages.Task:
    spec = TaskSpec(strategy="fedmask", arch="har_cnn", num_classes=NUM_CLASSES, seed=0)
    # A quorum nobody reaches: the round stays open and every update is ingested into it.
    schedule = {"rounds": 1, "quorum": updates + 1, "deadline_s": 3600.0}
    return build_task(FLEET, spec, schedule, task_id=f"bench-ingest-{repeat}")


def precomputed_updates(task: messages.Task, count: int, num_bits: int) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    payloads = {}
    for index in range(count):
        device = f"dev-{index:05d}"
        update = messages.Update(
            fleet=FLEET,
            task_id=task.task_id,
            device=device,
            round=1,
            base_round=1,
            num_samples=64,
            metrics={"loss": 0.5, "density": 0.5},
            body={"mask": Coded(rng.random(num_bits) < 0.5, "bits")},
        )
        payloads[device] = messages.encode(update)
    return payloads


def mqtt_ingest(task: messages.Task, payloads: dict[str, bytes], publishers: int) -> float:
    """Updates per second from the first publish to the last receipt."""
    topics = Topics(FLEET)
    with tempfile.TemporaryDirectory(prefix="fedmask-wire-") as folder:
        store = temporary_store(Path(folder))
        for device in payloads:  # registered devices, as after their presence messages
            store.upsert_device(FLEET, device, presence="online")
        with EmbeddedBroker(workdir=Path(folder) / "broker", backend="mosquitto") as broker:
            receipts = 0
            counted = threading.Condition()

            def count(message: ReceivedMessage) -> None:
                nonlocal receipts
                if messages.decode(message.payload, messages.Directive).kind == "receipt":
                    with counted:
                        receipts += 1
                        counted.notify_all()

            listener = MqttConnection(broker.url, "bench-receipts", dispatch="network")
            listener.subscribe(f"{topics.prefix}/down/+", count)
            listener.connect()
            aggregator = AggregatorService(broker.url, FLEET, task, store).start()
            senders = [MqttConnection(broker.url, f"bench-sender-{i}") for i in range(publishers)]
            for sender in senders:
                sender.connect()
            devices = sorted(payloads)

            def send(index: int) -> None:
                pending = [
                    senders[index].publish(topics.up(device), payloads[device], wait=False)
                    for device in devices[index::publishers]
                ]
                for info in pending:
                    info.wait_for_publish(60)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(publishers)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            with counted:
                if not counted.wait_for(lambda: receipts >= len(payloads), 300):
                    raise TimeoutError(f"{receipts} of {len(payloads)} receipts after 300 s")
            elapsed = time.perf_counter() - started
            for thread in threads:
                thread.join()
            for connection in (*senders, listener):
                connection.close()
            aggregator.stop()
        stored = len(store.accepted_updates(task.task_id, 1))
        store.close()
    if stored != len(payloads):
        raise RuntimeError(f"{stored} of {len(payloads)} updates stored")
    return len(payloads) / elapsed


def direct_ingest(task: messages.Task, payloads: dict[str, bytes]) -> float:
    """Baseline: ``Store.record_update`` of the same payloads, one committed transaction each."""
    with tempfile.TemporaryDirectory(prefix="fedmask-wire-") as folder:
        store = temporary_store(Path(folder))
        store.register_task(
            FLEET, task.task_id, spec={}, seed=0, weights_digest=task.weights_digest, strategy="fedmask",
            arch="har_cnn",
        )  # fmt: skip
        deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
        store.open_round(task.task_id, 1, quorum=len(payloads) + 1, deadline=deadline)
        fields = {"base_round": 1, "staleness": 0, "weight": 1.0, "num_samples": 64}
        started = time.perf_counter()
        for device, payload in payloads.items():
            store.record_update(task.task_id, 1, device, payload=payload, metrics={"loss": 0.5}, **fields)
        elapsed = time.perf_counter() - started
        store.close()
    return len(payloads) / elapsed


def ingest_rows(updates: int, publishers: int, repeats: int) -> list[dict[str, Any]]:
    from fedmask.strategies.fedmask import FedMaskServer

    mqtt_rates, direct_rates, sizes = [], [], []
    for repeat in range(repeats):  # the two variants take turns, so both see the same CPU weather
        task = hmp_cnn_task(updates, repeat)
        num_bits = FedMaskServer(spec_from_task(task)).num_bits
        payloads = precomputed_updates(task, updates, num_bits)
        sizes = [len(p) for p in payloads.values()]
        mqtt_rates.append(mqtt_ingest(task, payloads, publishers))
        direct_rates.append(direct_ingest(task, payloads))
    baseline = statistics.median(direct_rates)
    common = {"updates": updates, "repeats": repeats, "update_bytes": int(statistics.median(sizes))}
    return [
        {
            "what": f"MQTT -> aggregator ({publishers} publishers): decode, checks, commit, ack, receipt",
            **common,
            "updates_per_s": statistics.median(mqtt_rates),
            "x_baseline": statistics.median(mqtt_rates) / baseline,
        },
        {
            "what": "Store.record_update directly (baseline)",
            **common,
            "updates_per_s": baseline,
            "x_baseline": 1.0,
        },
    ]


# -- report --------------------------------------------------------------------------------------------

ROUND_COLUMNS = [
    ("agents", "agents", "{}"),
    ("round_s", "round s", "{:.2f}"),
    ("train_ms", "train ms/dev", "{:.1f}"),
    ("encode_ms", "encode ms/dev", "{:.2f}"),
    ("publish_ms", "publish ms/dev", "{:.2f}"),
    ("ingest_ms", "ingest ms/upd", "{:.2f}"),
    ("aggregate_ms", "aggregate ms", "{:.1f}"),
    ("announce_ms", "announce ms", "{:.2f}"),
    ("update_bytes", "update B", "{}"),
    ("agent_processes", "agent procs", "{}"),
    ("aggregator_rss_mib", "aggregator RSS MiB", "{:.0f}"),
    ("aggregator_rss_growth_mib", "RSS growth MiB", "{:.0f}"),
    ("broker_rss_mib", "broker RSS MiB", "{:.1f}"),
    ("inproc_round_s", "in-process round s", "{:.2f}"),
    ("x_inproc", "x in-process", "{:.2f}"),
]
INGEST_COLUMNS = [
    ("what", "what", "{}"),
    ("updates", "updates", "{}"),
    ("update_bytes", "update B", "{}"),
    ("updates_per_s", "updates/s", "{:.0f}"),
    ("x_baseline", "x baseline", "{:.2f}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 50, 100], help="fleet sizes")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per fleet size")
    parser.add_argument("--updates", type=int, default=300, help="updates per ingest repeat")
    parser.add_argument("--publishers", type=int, default=4, help="publisher connections for ingest")
    parser.add_argument("--repeats", type=int, default=3, help="ingest repeats (median reported)")
    parser.add_argument("--quick", action="store_true", help="10 agents, 2 rounds, 1 x 100 updates")
    parser.add_argument(
        "--agent-processes", type=int, default=None, help="agent processes (default: one per 100 agents)"
    )
    parser.add_argument("--no-ingest", action="store_true", help="rounds only (skip the ingest part)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process baseline")
    parser.add_argument(
        "--nagle", action="store_true", help="leave Nagle's algorithm on (the baseline for TCP_NODELAY)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_wire.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.rounds, args.updates, args.repeats = [10], 2, 100, 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)  # one training at a time on a small shared machine, as on a device
    warm_up()
    if args.nagle:
        transport.DEFAULT_TCP_NODELAY = False
    sockets = "Nagle (paho default sockets)" if args.nagle else "TCP_NODELAY"

    round_rows = []
    for agents in args.agents:
        print(f"rounds: {agents} agents x {args.rounds} rounds ...", file=sys.stderr)
        round_rows.append(round_row(agents, args.rounds, args.agent_processes, not args.no_baseline))
    ingest = []
    if not args.no_ingest:
        print(f"ingest: {args.repeats} x {args.updates} updates ...", file=sys.stderr)
        ingest = ingest_rows(args.updates, args.publishers, args.repeats)

    print_table(
        f"FedMask rounds over Mosquitto, {sockets} (har_cnn x0.25, 16 windows/device; "
        f"median of {args.rounds} rounds)",
        round_rows,
        [column for column in ROUND_COLUMNS if column[0] in round_rows[0]],
    )
    if ingest:
        print_table(
            f"Aggregator ingest, SQLite, {sockets} (har_cnn updates, 78,048 mask bits)",
            ingest,
            INGEST_COLUMNS,
        )
    write_report(args.out, "wire", argv, tcp_nodelay=not args.nagle, rounds=round_rows, ingest=ingest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
