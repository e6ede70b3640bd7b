#!/usr/bin/env python3
"""Parallel simulation benchmark: round throughput of `fedmask simulate` sequential vs --workers N vs Ray.

Runs FedMask on the accuracy benchmark's HMP and Fashion-MNIST (shards) workloads, the same seed and
settings for every executor, in one run: sequential (one torch thread, as `fedmask simulate` defaults),
``--workers N`` for each N of ``--workers-list`` (local processes), and ``--backend ray`` with the
largest N on a local Ray instance (a cluster of one node, started here). Round time is the wall time of
a round (announce, train, encode, aggregate and, where scheduled, evaluation of every device); the
median over the steady rounds (round 1, which starts the workers, is left out) is compared with the
sequential median measured in the same run, next to how busy the machine was: the 1-minute load
average before and after each run and ``other cores``, the CPU other processes used during the run
(machine busy time less this process and its workers, per second of wall time; Ray's actors count as
other). Ratios measured while other jobs ran mean little. Every executor's per-round accuracies, bytes
and final masks must equal the sequential run's (the ``identical`` column).

    python benchmarks/sim_workers.py                       # 1 and 2 workers + Ray, ~10 min on 2 cores
    python benchmarks/sim_workers.py --workers-list 1,2,4,8,16,32 --rounds 8   # a bigger machine
    flock /tmp/fedmask-bench.lock python benchmarks/sim_workers.py          # on a shared machine

Writes <out>/sim_workers.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accuracy import WORKLOADS
from table import print_table

from fedmask.datasets.workloads import WORKLOADS as DATA_WORKLOADS
from fedmask.datasets.workloads import load_workload
from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.executors import stop_ray
from fedmask.simulator.inproc import InProcessRun
from fedmask.simulator.run import task_spec

BENCH_WORKLOADS = ("hmp", "fashion_mnist")


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy (Linux /proc/stat; all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_s() -> float:
    """CPU seconds of this process and its finished (joined) worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def workload_config(name: str, rounds: int, output_dir: Path, data_root: Path | None) -> SimulationConfig:
    base, _ = WORKLOADS[name]
    settings = {**base, "rounds": rounds, "tflite_devices": 0}  # TFLite latency is not what we time
    return SimulationConfig(strategies=["fedmask"], output_dir=output_dir, data_root=data_root, **settings)


def run_once(config: SimulationConfig, data) -> dict:
    arch = config.arch or DATA_WORKLOADS[config.dataset].architecture
    run = InProcessRun(config, data, task_spec(config, "fedmask", arch, data.num_classes))
    result = run.run()
    rounds = [r.wall_s for r in result.rounds]
    return {
        "round_s": rounds,
        "steady_round_s": statistics.median(rounds[1:]),
        "finalize_s": result.wall_s - sum(rounds),
        "total_s": result.wall_s,
        # What must not change with the executor:
        "outcome": {
            "round_accuracy": [r.accuracy_mean for r in result.rounds],
            "uplink_bytes": [r.uplink_bytes for r in result.rounds],
            "downlink_bytes": [r.downlink_bytes for r in result.rounds],
            "device_accuracy": [d.accuracy for d in result.devices],
        },
        "masks": {d: f.mask for d, f in run.finals.items()},
    }


def same(a: dict, b: dict) -> bool:
    return a["outcome"] == b["outcome"] and all(
        np.array_equal(a["masks"][d], b["masks"][d]) for d in a["masks"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(BENCH_WORKLOADS), help="comma-separated subset")
    parser.add_argument("--workers-list", default="1,2", help="worker counts to measure (1: sequential)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run (the first is not timed)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-sim-workers"), help="output directory")
    parser.add_argument("--data-root", type=Path, help="data sets directory (default ../shared/datasets)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    torch.set_num_threads(1)  # the sequential reference: one thread, as every worker
    counts = sorted({int(n) for n in args.workers_list.split(",")} | {1})
    modes = [("local", n) for n in counts] + ([] if args.no_ray else [("ray", counts[-1])])
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows, results = [], {}
    for name in args.workloads.split(","):
        base = workload_config(name, args.rounds, args.out / name, args.data_root)
        data = load_workload(
            base.dataset,
            base.data_root,
            partition=base.partition,
            num_devices=base.devices,
            seed=base.seed,
            **base.dataset_kwargs,
        )
        runs = {}
        for backend, workers in modes:
            label = "sequential" if (backend, workers) == ("local", 1) else f"{backend} x{workers}"
            config = dataclasses.replace(base, workers=workers, backend=backend, ray_address=args.ray_address)
            t0, load, busy, own = time.perf_counter(), os.getloadavg()[0], busy_s(), own_s()
            runs[label] = run_once(config, data)
            wall = time.perf_counter() - t0
            runs[label]["load"] = (load, os.getloadavg()[0])  # 1-min load average before, after
            runs[label]["other_cores"] = max(0.0, (busy_s() - busy) - (own_s() - own)) / wall
            logging.warning("%s %s: %.0fs", name, label, time.perf_counter() - t0)
        reference = runs["sequential"]
        results[name] = {}
        for label, run in runs.items():
            entry = {
                k: run[k]
                for k in ("round_s", "steady_round_s", "finalize_s", "total_s", "load", "other_cores")
            }
            entry["load_text"] = "{:.1f} / {:.1f}".format(*run["load"])
            entry["speedup"] = reference["steady_round_s"] / run["steady_round_s"]
            entry["finalize_speedup"] = reference["finalize_s"] / run["finalize_s"]
            entry["identical"] = same(reference, run)
            results[name][label] = entry
            rows.append({"workload": name, "executor": label, **entry})
    stop_ray()
    document = {
        "command": " ".join(
            ["python", "benchmarks/sim_workers.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "workloads": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sim_workers.json").write_text(json.dumps(document, indent=2))
    print_table(
        f"FedMask round time by executor ({os.cpu_count()} CPUs; median of rounds 2-{args.rounds})",
        rows,
        [
            ("workload", "workload", "{}"),
            ("executor", "executor", "{}"),
            ("steady_round_s", "round s", "{:.2f}"),
            ("speedup", "x sequential", "{:.2f}"),
            ("finalize_s", "finalize s", "{:.1f}"),
            ("finalize_speedup", "finalize x", "{:.2f}"),
            ("total_s", "total s", "{:.1f}"),
            ("identical", "identical", "{}"),
            ("load_text", "load before / after", "{}"),
            ("other_cores", "other cores", "{:.2f}"),
        ],
    )
    print(
        f"\nload average before {load_before[0]:.2f}, after {document['load_average_after'][0]:.2f}; "
        f"written {args.out / 'sim_workers.json'}"
    )
    return 0 if all(e["identical"] for w in results.values() for e in w.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
