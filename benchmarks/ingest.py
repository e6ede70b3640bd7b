"""Ingest benchmark: the aggregator's group commit against one commit per update, and round cost by fleet.

1. Ingest. The real aggregator (`AggregatorService`: decode, checks, store, ack, receipt) behind a real
   Mosquitto, storing into SQLite (a file, synchronous=FULL) or PostgreSQL (a scratch database on the
   local server, as the tests make one). A publisher process (its own interpreter, as devices are other
   machines) sends U precomputed FedMask updates of the HMP CNN (har_cnn, 78,048 mask bits at density
   0.5, ~9.8 KB) for U registered devices, as fast as the broker takes them, from P connections, and
   counts the receipts. Rate = updates answered with a receipt per second, first publish to last
   receipt; and the aggregator process's CPU time per update (all its threads: MQTT, decoding, SQL),
   which depends less on what else the machine runs. Variants, taking turns in the same run: group
   commit (batches of up to ``--batch-max``, a first message waits at most ``--batch-wait-ms``) and the
   baseline, one commit per update (``batch_max=1``: each update committed, acked and answered before
   the next is looked at), and group commit with the batches written by a child process
   (``--store-writer process``; its CPU counted with the aggregator's).
2. Rounds. D devices (10, 100, 1,000) each send one update with quorum D through the same path; the
   update that completes the quorum closes round 1. Reported: aggregate (read the round's updates back
   from the store, decode, aggregate, store the aggregate) and announce (open round 2, code its
   announcement, publish it and wait for the PUBACK), both over the real store and broker.

3. Presence storm (``--presence-storm N``, instead of 1 and 2): a reconnection storm, as after a broker
   restart. N registered devices (stored offline) each publish one retained online ``Presence`` from the
   publisher process (P connections); timed from the first publish until the store shows all N online
   (the publisher process polls the database every 10 ms). Reported: presences/s, the aggregator
   process's CPU ms per presence, and its batches (``service.batch_sizes``, empty for an aggregator
   that commits presences one at a time). Only the aggregator's public API is used, so the script also
   measures another checkout: run it with that tree's interpreter.

Prints a table, writes JSON. Run it under the shared CPU lock:

    flock /tmp/fedmask-bench.lock .venv/bin/python benchmarks/ingest.py
    .venv/bin/python benchmarks/ingest.py --engines sqlite --quick
    flock /tmp/fedmask-bench.lock .venv/bin/python benchmarks/ingest.py --presence-storm 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from table import print_table, write_report

from storage import PG_ADMIN, postgres_database, sqlite_database

FLEET = "bench-ingest"
STALL_S = 20.0  # the publisher gives up when no receipt came for this long
NUM_CLASSES = 14
UTC = dt.timezone.utc


# -- the devices' side: another process ------------------------------------------------------------------


def updates_for(task_id: str, fleet: str, count: int, num_bits: int) -> dict[str, bytes]:
    """One encoded FedMask update per device, as a device would publish it (full coding)."""
    import numpy as np

    from fedmask.protocol import messages
    from fedmask.protocol.tensor_codec import Coded

    rng = np.random.default_rng(1)
    return {
        f"dev-{index:05d}": messages.encode(
            messages.Update(
                fleet=fleet,
                task_id=task_id,
                device=f"dev-{index:05d}",
                round=1,
                base_round=1,
                num_samples=64,
                metrics={"loss": 0.5, "density": 0.5},
                body={"mask": Coded(rng.random(num_bits) < 0.5, "bits")},
            )
        )
        for index in range(count)
    }


def publish_all(
    host: str, port: int, fleet: str, task_id: str, devices: int, num_bits: int, publishers: int, pipe
) -> None:
    """Child process: encode the updates, connect, say ready, wait for go, publish every update, count
    the receipts; sends back (seconds from first publish to last receipt, receipts, rejections)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fedmask.protocol import messages
    from fedmask.protocol.topics import Topics

    payloads = updates_for(task_id, fleet, devices, num_bits)
    topics = Topics(fleet)
    answered = {"receipt": 0, "rejected": 0}
    done = threading.Event()

    def count(client, userdata, message) -> None:
        kind = messages.decode(bytes(message.payload), messages.Directive).kind
        answered[kind] = answered.get(kind, 0) + 1
        if answered["receipt"] + answered["rejected"] >= len(payloads):
            done.set()

    def client(name: str) -> mqtt.Client:
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5
        )
        c.max_inflight_messages_set(1000)  # paho's default of 20 would make the publishers the bottleneck
        c.max_queued_messages_set(0)
        c.connect(host, port)
        c.loop_start()
        return c

    listener = client(f"{fleet}-receipts")
    listener.on_message = count
    listener.subscribe(f"{topics.prefix}/down/+", qos=1)
    senders = [client(f"{fleet}-sender-{i}") for i in range(publishers)]
    time.sleep(0.5)  # SUBACK and CONNACKs
    devices = sorted(payloads)
    pipe.send("ready")
    pipe.recv()

    def send(index: int) -> None:
        infos = [senders[index].publish(topics.up(d), payloads[d], qos=1) for d in devices[index::publishers]]
        for info in infos:
            info.wait_for_publish(120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(publishers)]
    cpu = time.process_time()  # this process's threads: paho sending, receipts decoded
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    # Done when every update is answered; given up when no answer came for STALL_S (a lost update is
    # never answered: these publishers do not republish as devices do) or after 300 s in all.
    last, heard = time.monotonic(), 0
    while not (finished := done.wait(1.0)) and time.perf_counter() - started < 300:
        now, count_now = time.monotonic(), answered["receipt"] + answered["rejected"]
        if count_now != heard:
            last, heard = now, count_now
        elif now - last > STALL_S:
            break
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    for thread in threads:
        thread.join(10)
    for c in (*senders, listener):
        c.disconnect()
        c.loop_stop()
    pipe.send((elapsed if finished else None, answered["receipt"], answered["rejected"], cpu))


def storm_publish(host: str, port: int, fleet: str, url: str, devices: int, publishers: int, pipe) -> None:
    """Child process: connect, say ready, wait for go, publish one retained online presence per device,
    then poll the store until all are online; sends back (seconds from first publish to the last one
    stored or None, presences stored, this process's CPU seconds)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from sqlalchemy import func, select

    from fedmask.protocol import messages
    from fedmask.protocol.topics import Topics
    from fedmask.storage import Store
    from fedmask.storage.schema import Device, Fleet

    topics = Topics(fleet)
    names = [f"dev-{index:05d}" for index in range(devices)]
    capabilities = {"mask_codings": ["bits", "mctx"], "consensus": None}  # what an agent sends
    at = time.time()  # after the devices were registered offline: every presence is newer
    payloads = {
        name: messages.encode(
            messages.Presence(fleet=fleet, device=name, status="online", at=at, capabilities=capabilities)
        )
        for name in names
    }

    def client(name: str) -> mqtt.Client:
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5
        )
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.connect(host, port)
        c.loop_start()
        return c

    senders = [client(f"{fleet}-device-{i}") for i in range(publishers)]
    online = (
        select(func.count(Device.id))
        .join(Fleet, Fleet.id == Device.fleet_pk)
        .where(Fleet.name == fleet, Device.presence == "online")
    )
    store = Store(url)
    time.sleep(0.5)  # CONNACKs
    pipe.send("ready")
    pipe.recv()

    def send(index: int) -> None:
        infos = [
            senders[index].publish(topics.state(d), payloads[d], qos=1, retain=True)
            for d in names[index::publishers]
        ]
        for info in infos:
            info.wait_for_publish(120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(publishers)]
    cpu = time.process_time()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    elapsed, stored = None, 0
    while time.perf_counter() - started < 300:
        with store.engine.connect() as connection:
            stored = connection.scalar(online)
        if stored >= devices:
            elapsed = time.perf_counter() - started
            break
        time.sleep(0.01)
    cpu = time.process_time() - cpu
    for thread in threads:
        thread.join(10)
    for c in senders:
        c.disconnect()
        c.loop_stop()
    store.close()
    pipe.send((elapsed, stored, cpu))


# -- the aggregator's side: this process ----------------------------------------------------------------


def hmp_task(fleet: str, task_id: str, quorum: int, rounds: int):
    from fedmask.aggregator.tasks import build_task
    from fedmask.strategies import TaskSpec

    spec = TaskSpec(strategy="fedmask", arch="har_cnn", num_classes=NUM_CLASSES, seed=0)
    return build_task(
        fleet, spec, {"rounds": rounds, "quorum": quorum, "deadline_s": 3600.0}, task_id=task_id
    )


def register(store, fleet: str, devices: list[str], presence: str = "online") -> None:
    """Devices known to the store, as after their presence messages (one bulk insert: set-up, not
    measured)."""
    from sqlalchemy import insert

    from fedmask.storage.schema import Device, Fleet

    now = dt.datetime.now(UTC)
    with store.engine.begin() as connection:
        fleet_pk = connection.execute(
            insert(Fleet).values(name=fleet, created_at=now).returning(Fleet.id)
        ).scalar_one()
        seen = {"presence": presence, "presence_at": now, "first_seen_at": now, "last_seen_at": now}
        connection.execute(insert(Device), [{"fleet_pk": fleet_pk, "device_id": d, **seen} for d in devices])


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _broker_drops(broker) -> str:
    """Why updates may have gone missing: the broker's session queue for the aggregator overflowed.
    Devices republish until they get a receipt; this benchmark's publishers do not, so it says so."""
    log_path = getattr(broker, "log_path", None)
    log = Path(log_path).read_text(errors="replace") if log_path and Path(log_path).exists() else ""
    if "Outgoing messages are being dropped" not in log:
        return ""
    return (
        f"; Mosquitto dropped messages for a client whose queue was full ({log_path}): a burst larger "
        "than its max_queued_messages plus the aggregator's Receive Maximum; use fewer --updates"
    )


def run_fleet(
    broker,
    url: str,
    name: str,
    devices: int,
    *,
    quorum: int,
    batch_max: int,
    batch_wait_s: float,
    publishers: int,
    store_writer: str = "process",
) -> dict[str, Any]:
    """One aggregator on a fresh store; ``devices`` devices each send one update. Returns timings."""
    from fedmask.aggregator.service import AggregatorService
    from fedmask.device_agent.agent import spec_from_task
    from fedmask.heap import settle_for_service
    from fedmask.storage import Store
    from fedmask.strategies.fedmask import FedMaskServer

    fleet = f"{FLEET}-{name}"
    task = hmp_task(fleet, f"task-{name}", quorum=quorum, rounds=2)
    num_bits = FedMaskServer(spec_from_task(task)).num_bits
    with Store(url) as store:
        store.upgrade()
        register(store, fleet, [f"dev-{index:05d}" for index in range(devices)])
        service = AggregatorService(
            broker.url,
            fleet,
            task,
            store,
            batch_max=batch_max,
            batch_wait_s=batch_wait_s,
            store_writer=store_writer,
        ).start()
        settle_for_service()  # as `fedmask aggregator run` does
        # The store writer's child process is the aggregator's too: its CPU is counted with ours.
        writer_pid = service.writer.pid if service.writer is not None else None
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        child = context.Process(
            target=publish_all,
            args=(broker.host, broker.port, fleet, task.task_id, devices, num_bits, publishers, theirs),
        )
        child.start()
        try:
            if not ours.poll(60):
                raise TimeoutError("the publisher process did not connect within 60 s")
            ours.recv()
            cpu = time.process_time()  # every thread of this process: the aggregator's CPU
            writer_cpu = process_cpu_s(writer_pid) if writer_pid else 0.0
            broker_cpu = process_cpu_s(broker.pid)
            ours.send("go")
            if not ours.poll(330):
                raise TimeoutError("the publisher process did not report within 330 s")
            elapsed, receipts, rejected, publisher_cpu = ours.recv()
            cpu = time.process_time() - cpu
            if writer_pid:
                cpu += process_cpu_s(writer_pid) - writer_cpu
            broker_cpu = process_cpu_s(broker.pid) - broker_cpu
        finally:
            child.join(30)
            service.stop()
        if elapsed is None or receipts != devices:
            raise RuntimeError(
                f"{name}: {receipts} receipts and {rejected} rejections for {devices} updates"
                + _broker_drops(broker)
            )
        stored = sum(len(store.accepted_updates(task.task_id, r)) for r in (1, 2))
        if stored != devices:
            raise RuntimeError(f"{name}: {stored} of {devices} updates stored")
        timing = service.manager.timings.get(1)
    sizes = service.batch_sizes
    announce_ms = None
    if timing is not None and timing.announce_s is not None:  # coded, then published (the service's last)
        announce_ms = (timing.announce_s + service.announce_s[-1]) * 1e3
    return {
        "updates_per_s": devices / elapsed,
        "cpu_ms_per_update": cpu * 1e3 / devices,
        # The rest of the machine's work per update: what the CPU budget leaves the aggregator.
        "publisher_cpu_ms_per_update": publisher_cpu * 1e3 / devices,
        "broker_cpu_ms_per_update": broker_cpu * 1e3 / devices,
        "batches": len(sizes),
        "median_batch": statistics.median(sizes) if sizes else 0,
        "aggregate_ms": timing.aggregate_s * 1e3 if timing and timing.aggregate_s else None,
        "announce_ms": announce_ms,
    }


def run_storm(
    broker, url: str, name: str, devices: int, *, batch_max: int, batch_wait_s: float, publishers: int
):
    """One aggregator on a fresh store with ``devices`` devices stored offline; each comes online."""
    from fedmask.aggregator.service import AggregatorService
    from fedmask.storage import Store

    fleet = f"{FLEET}-{name}"
    task = hmp_task(fleet, f"task-{name}", quorum=devices + 1, rounds=2)
    with Store(url) as store:
        store.upgrade()
        register(store, fleet, [f"dev-{index:05d}" for index in range(devices)], presence="offline")
        service = AggregatorService(
            broker.url, fleet, task, store, batch_max=batch_max, batch_wait_s=batch_wait_s
        ).start()
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        child = context.Process(
            target=storm_publish,
            args=(broker.host, broker.port, fleet, url, devices, publishers, theirs),
        )
        child.start()
        try:
            if not ours.poll(60):
                raise TimeoutError("the publisher process did not connect within 60 s")
            ours.recv()
            cpu = time.process_time()  # every thread of this process: the aggregator's CPU
            ours.send("go")
            if not ours.poll(330):
                raise TimeoutError("the publisher process did not report within 330 s")
            elapsed, stored, publisher_cpu = ours.recv()
            cpu = time.process_time() - cpu
        finally:
            child.join(30)
            service.stop()
        if elapsed is None:
            raise RuntimeError(f"{name}: {stored} of {devices} presences stored")
    sizes = getattr(service, "batch_sizes", [])
    return {
        "presences_per_s": devices / elapsed,
        "cpu_ms_per_presence": cpu * 1e3 / devices,
        "publisher_cpu_ms_per_presence": publisher_cpu * 1e3 / devices,
        "batches": len(sizes),
        "median_batch": statistics.median(sizes) if sizes else 0,
    }


def storm_rows(broker, engine: str, args) -> list[dict[str, Any]]:
    runs = []
    for repeat in range(args.repeats):
        database = sqlite_database() if engine == "sqlite" else postgres_database(args.pg_admin)
        with database as url:
            print(
                f"[{engine}] presence storm, repeat {repeat + 1}: {args.presence_storm} devices ...",
                file=sys.stderr,
            )
            runs.append(
                run_storm(
                    broker,
                    url,
                    f"{engine}-storm-{repeat}",
                    args.presence_storm,
                    batch_max=args.batch_max,
                    batch_wait_s=args.batch_wait_ms / 1e3,
                    publishers=args.publishers,
                )
            )
    return [
        {
            "engine": engine,
            "devices": args.presence_storm,
            "repeats": args.repeats,
            "presences_per_s": statistics.median(r["presences_per_s"] for r in runs),
            "all_presences_per_s": [round(r["presences_per_s"], 1) for r in runs],
            "cpu_ms_per_presence": statistics.median(r["cpu_ms_per_presence"] for r in runs),
            "all_cpu_ms_per_presence": [round(r["cpu_ms_per_presence"], 2) for r in runs],
            "publisher_cpu_ms_per_presence": statistics.median(
                r["publisher_cpu_ms_per_presence"] for r in runs
            ),
            "batches": statistics.median(r["batches"] for r in runs),
            "median_batch": statistics.median(r["median_batch"] for r in runs),
        }
    ]


def ingest_rows(broker, engine: str, args) -> list[dict[str, Any]]:
    variants = {
        "one commit per update (baseline)": (1, 0.0),
        f"group commit (<= {args.batch_max}, <= {args.batch_wait_ms:g} ms), writer thread": (
            args.batch_max,
            args.batch_wait_ms / 1e3,
        ),
    }
    if args.store_writer_process:
        variants["group commit, writer process (the default)"] = (args.batch_max, args.batch_wait_ms / 1e3)
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in variants}
    for repeat in range(args.repeats):  # the variants take turns: both see the same CPU weather
        for index, (label, (batch_max, wait_s)) in enumerate(variants.items()):
            writer = "process" if "writer process" in label else "thread"
            database = sqlite_database() if engine == "sqlite" else postgres_database(args.pg_admin)
            with database as url:
                print(f"[{engine}] {label}, repeat {repeat + 1}: {args.updates} updates ...", file=sys.stderr)
                results[label].append(
                    run_fleet(
                        broker,
                        url,
                        f"{engine}-{repeat}-{index}",
                        args.updates,
                        quorum=args.updates + 1,  # never reached: every update goes to round 1
                        batch_max=batch_max,
                        batch_wait_s=wait_s,
                        publishers=args.publishers,
                        store_writer=writer,
                    )
                )
    baseline = statistics.median(r["updates_per_s"] for r in results[next(iter(variants))])
    rows = []
    for label, runs in results.items():
        rate = statistics.median(r["updates_per_s"] for r in runs)
        rows.append(
            {
                "engine": engine,
                "what": label,
                "updates": args.updates,
                "repeats": args.repeats,
                "updates_per_s": rate,
                "all_updates_per_s": [round(r["updates_per_s"], 1) for r in runs],
                "median_batch": statistics.median(r["median_batch"] for r in runs),
                "cpu_ms_per_update": statistics.median(r["cpu_ms_per_update"] for r in runs),
                "publisher_cpu_ms_per_update": statistics.median(
                    r["publisher_cpu_ms_per_update"] for r in runs
                ),
                "broker_cpu_ms_per_update": statistics.median(r["broker_cpu_ms_per_update"] for r in runs),
                "x_baseline": rate / baseline,
            }
        )
    return rows


def round_rows(broker, engine: str, args) -> list[dict[str, Any]]:
    rows = []
    for devices in args.devices:
        runs = []
        for repeat in range(args.round_repeats):
            database = sqlite_database() if engine == "sqlite" else postgres_database(args.pg_admin)
            with database as url:
                print(f"[{engine}] round of {devices} devices, repeat {repeat + 1} ...", file=sys.stderr)
                runs.append(
                    run_fleet(
                        broker,
                        url,
                        f"{engine}-round-{devices}-{repeat}",
                        devices,
                        quorum=devices,
                        batch_max=args.batch_max,
                        batch_wait_s=args.batch_wait_ms / 1e3,
                        publishers=args.publishers,
                    )
                )
        aggregate = statistics.median(r["aggregate_ms"] for r in runs)
        announce = statistics.median(r["announce_ms"] for r in runs)
        rows.append(
            {
                "engine": engine,
                "devices": devices,
                "aggregate_ms": aggregate,
                "announce_ms": announce,
                "aggregate_us_per_device": aggregate * 1e3 / devices,
                "announce_us_per_device": announce * 1e3 / devices,
            }
        )
    return rows


INGEST_COLUMNS = [
    ("engine", "ENGINE", "{}"),
    ("what", "WHAT", "{}"),
    ("updates", "UPDATES", "{}"),
    ("median_batch", "MEDIAN BATCH", "{:g}"),
    ("updates_per_s", "UPDATES/S", "{:.0f}"),
    ("x_baseline", "x BASELINE", "{:.2f}"),
    ("cpu_ms_per_update", "AGGREGATOR CPU MS/UPDATE", "{:.2f}"),
    ("publisher_cpu_ms_per_update", "PUBLISHER", "{:.2f}"),
    ("broker_cpu_ms_per_update", "MOSQUITTO", "{:.2f}"),
]
STORM_COLUMNS = [
    ("engine", "ENGINE", "{}"),
    ("devices", "DEVICES", "{}"),
    ("presences_per_s", "PRESENCES/S", "{:.0f}"),
    ("all_presences_per_s", "RUNS", "{}"),
    ("cpu_ms_per_presence", "AGGREGATOR CPU MS/PRESENCE", "{:.2f}"),
    ("publisher_cpu_ms_per_presence", "PUBLISHER", "{:.2f}"),
    ("batches", "BATCHES", "{:g}"),
    ("median_batch", "MEDIAN BATCH", "{:g}"),
]
ROUND_COLUMNS = [
    ("engine", "ENGINE", "{}"),
    ("devices", "DEVICES", "{}"),
    ("aggregate_ms", "AGGREGATE MS", "{:.1f}"),
    ("aggregate_us_per_device", "us/DEVICE", "{:.0f}"),
    ("announce_ms", "ANNOUNCE MS", "{:.1f}"),
    ("announce_us_per_device", "us/DEVICE", "{:.1f}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engines", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--updates", type=int, default=6000, help="updates per ingest measurement")
    parser.add_argument("--repeats", type=int, default=3, help="ingest repeats per variant (median reported)")
    parser.add_argument("--publishers", type=int, default=4, help="publisher connections")
    parser.add_argument(
        "--batch-max", type=int, default=512, help="group commit batch size (the aggregator's default)"
    )
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--no-store-writer-process",
        dest="store_writer_process",
        action="store_false",
        help="skip the variant whose batches are written by a child process (--store-writer process)",
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000], help="round sizes")
    parser.add_argument("--round-repeats", type=int, default=3)
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="psycopg conninfo allowed to CREATE DATABASE")
    parser.add_argument(
        "--presence-storm", type=int, metavar="N", help="only a reconnection storm of N devices' presences"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ingest.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.updates, args.repeats, args.devices, args.round_repeats = 300, 1, [10, 100], 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fedmask.broker_config.embedded import EmbeddedBroker

    ingest, rounds, storms = [], [], []
    with (
        tempfile.TemporaryDirectory(prefix="fedmask-ingest-") as folder,
        EmbeddedBroker(workdir=Path(folder) / "broker", backend="mosquitto") as broker,
    ):
        for engine in args.engines:
            if args.presence_storm:
                storms += storm_rows(broker, engine, args)
                continue
            ingest += ingest_rows(broker, engine, args)
            rounds += round_rows(broker, engine, args)

    if args.presence_storm:
        print_table(
            f"Presence storm over Mosquitto: {args.presence_storm} devices come online, {args.publishers} "
            f"publisher connections (median of {args.repeats})",
            storms,
            STORM_COLUMNS,
        )
        write_report(args.out, "presence_storm", argv, args, storms=storms)
        return 0
    print_table(
        f"Aggregator ingest over Mosquitto: ~9.8 KB FedMask updates, {args.publishers} publisher connections "
        f"(median of {args.repeats})",
        ingest,
        INGEST_COLUMNS,
    )
    print_table(
        f"One round closing at its quorum: aggregate and announce (median of {args.round_repeats})",
        rounds,
        ROUND_COLUMNS,
    )
    write_report(args.out, "ingest", argv, args, ingest=ingest, rounds=rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
