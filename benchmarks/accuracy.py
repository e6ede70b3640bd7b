#!/usr/bin/env python3
"""Accuracy benchmark: FedMask against FedAvg, FedAvg + fine-tuning and local training on real data.

Workloads (all offline): HMP wrist accelerometer by volunteer (16 devices, natural partition),
Fashion-MNIST pathological (100 devices, 2 shards of 300 images each, 20 per round), Shakespeare by
speaker (speakers with >= 20 speeches). Every method sees the same partition, seed, rounds and local
epochs; communication is counted from encoded messages.

    python benchmarks/accuracy.py            # default size (< 30 min on 2 cores)
    python benchmarks/accuracy.py --quick    # smoke size (< 3 min)

Writes <out>/<workload>/results.{json,md} and PNGs, plus <out>/accuracy.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.run import run_simulation

STRATEGIES = ["fedmask", "fedavg", "fedavg_ft", "local"]

# name -> (config at default size, overrides for --quick)
WORKLOADS: dict[str, tuple[dict, dict]] = {
    "hmp": (
        {"dataset": "hmp", "rounds": 20, "local_epochs": 1},
        {"rounds": 3},
    ),
    "fashion_mnist": (
        {
            "dataset": "fashion_mnist",
            "partition": "shards",
            "devices": 100,
            "devices_per_round": 20,
            "rounds": 10,
            "local_epochs": 2,
            "arch_kwargs": {"width": 0.25},
            "eval_every": 5,
        },
        # A smaller fleet at the smoke size; shard_size keeps each device's data as at 100 devices.
        {
            "rounds": 2,
            "eval_every": 2,
            "devices": 10,
            "devices_per_round": 5,
            "dataset_kwargs": {"shard_size": 300},
        },
    ),
    "shakespeare": (
        {
            "dataset": "shakespeare",
            "devices": 50,
            "devices_per_round": 10,
            "rounds": 10,
            "local_epochs": 1,
            "eval_every": 5,
            "dataset_kwargs": {"max_train_per_speaker": 100, "max_test_per_speaker": 30},
        },
        {
            "rounds": 2,
            "eval_every": 2,
            "dataset_kwargs": {"max_train_per_speaker": 20, "max_test_per_speaker": 10},
        },
    ),
}


def benchmark_config(
    name: str,
    quick: bool = False,
    seed: int = 0,
    strategies: list[str] | None = None,
    output_dir: Path | None = None,
    data_root: Path | None = None,
) -> SimulationConfig:
    """The SimulationConfig the benchmark runs for workload ``name`` (``tests/test_cli_parity.py`` checks
    that `fedmask simulate` flags and config files express exactly this)."""
    base, overrides = WORKLOADS[name]
    settings = {**base, **(overrides if quick else {})}
    return SimulationConfig(
        strategies=list(strategies or STRATEGIES),
        seed=seed,
        output_dir=output_dir if output_dir is not None else Path("runs/bench-accuracy") / name,
        data_root=data_root,
        transport="inproc",
        **settings,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke size, under 3 minutes")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-accuracy", help="output directory")
    parser.add_argument("--data-root", help="data sets directory (default ../shared/datasets)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    out = Path(args.out)
    summary: dict[str, dict] = {}
    started = time.perf_counter()
    for name in args.workloads.split(","):
        config = benchmark_config(
            name,
            quick=args.quick,
            seed=args.seed,
            strategies=args.strategies.split(","),
            output_dir=out / name,
            data_root=Path(args.data_root) if args.data_root else None,
        )
        document = run_simulation(config)
        summary[name] = {
            "dataset": document["dataset"],
            "partition": document["partition"],
            "devices": document["devices"],
            "rounds": document["rounds"],
            "methods": {
                m: {k: v for k, v in r.items() if k not in ("rounds", "devices")}
                for m, r in document["methods"].items()
            },
        }
    result = {
        "quick": args.quick,
        "seed": args.seed,
        "wall_s": time.perf_counter() - started,
        "workloads": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(result, indent=2))

    print(f"{'workload':<14} {'method':<10} {'acc':>6} {'p10':>6} {'up b/p':>8} {'up MB':>8} {'wall s':>7}")
    for name, w in summary.items():
        for method, m in w["methods"].items():
            print(
                f"{name:<14} {method:<10} {m['accuracy_mean']:6.3f} {m['accuracy_p10']:6.3f} "
                f"{m['uplink_bits_per_param']:8.3f} {m['uplink_bytes_total'] / 1e6:8.2f} {m['wall_s']:7.1f}"
            )
    print(f"total {result['wall_s']:.0f}s; written {out / 'accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
