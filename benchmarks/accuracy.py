#!/usr/bin/env python3
"""Accuracy benchmark: FedMask against its FT-only ablation, FedAvg, FedAvg + fine-tuning and local training.

Workloads (all offline): HMP wrist accelerometer by volunteer (16 devices, natural partition),
Fashion-MNIST pathological shards (100 devices, 2 shards of 300 images, 20 per round), Fashion-MNIST
Dirichlet alpha=0.3 (50 devices, 10 per round), Shakespeare by speaker (a budget where FedAvg + FT
learns). Every method sees the same partition, seed, rounds and local epochs (``local`` trains every
device every round: it needs no network); communication is counted from encoded messages. Each
(workload, seed) cell is one ``fedmask simulate`` configuration (see ``benchmark_config``), run with
every method; cells run in ``--jobs`` worker processes, and each cell's devices in ``--workers``
processes of its own (``--backend ray``: actors of a Ray cluster; bit-identical results either way).

Per method it reports, mean and std over seeds: personalized test accuracy (sample-weighted) and its
10th percentile over devices, uplink bits per parameter, final mask density (per layer too), the
median compacted-parameter ratio and TFLite speedup of the real final models, and the devices with a
dead class (a class of their own training data their model never predicts).

    python benchmarks/accuracy.py            # default size: 3 seeds (< 90 min on 2 cores with --jobs 2)
    python benchmarks/accuracy.py --quick    # smoke size: 1 seed (< 3 min)
    python benchmarks/accuracy.py --jobs 1 --workers 32   # one cell at a time, its devices on 32 cores

Writes <out>/<workload>/seed-<n>/results.{json,md} and PNGs, <out>/accuracy.{json,md} and a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STRATEGIES = ["fedmask", "ft_only", "fedavg", "fedavg_ft", "local"]

# name -> (config at default size, overrides for --quick)
WORKLOADS: dict[str, tuple[dict, dict]] = {
    "hmp": (
        {"dataset": "hmp", "rounds": 20, "local_epochs": 1},
        {"rounds": 3, "tflite_devices": 2},
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
            "tflite_devices": 2,
        },
    ),
    "fashion_mnist_dirichlet": (
        {
            "dataset": "fashion_mnist",
            "partition": "dirichlet",
            "devices": 50,
            "devices_per_round": 10,
            "rounds": 10,
            "local_epochs": 2,
            "arch_kwargs": {"width": 0.25},
            "eval_every": 5,
            "dataset_kwargs": {"alpha": 0.3},
        },
        {
            "rounds": 2,
            "eval_every": 2,
            "devices": 10,
            "devices_per_round": 5,
            "dataset_kwargs": {"alpha": 0.3, "max_train_per_device": 300},
            "tflite_devices": 2,
        },
    ),
    "shakespeare": (
        {
            "dataset": "shakespeare",
            "devices": 30,
            "devices_per_round": 10,
            "rounds": 20,
            "local_epochs": 2,
            "eval_every": 10,
            "dataset_kwargs": {"max_train_per_speaker": 400, "max_test_per_speaker": 100},
        },
        {
            "rounds": 2,
            "eval_every": 2,
            "local_epochs": 1,
            "devices": 10,
            "dataset_kwargs": {"max_train_per_speaker": 20, "max_test_per_speaker": 10},
        },
    ),
}

# Numbers summarized over seeds (mean and std) per method.
SUMMARY_KEYS = (
    "accuracy_mean",
    "accuracy_p10",
    "uplink_bits_per_param",
    "density_mean",
    "compacted_params_ratio",
    "tflite_speedup",
    "dead_class_devices",
)


def benchmark_config(
    name: str,
    quick: bool = False,
    seed: int = 0,
    strategies: list[str] | None = None,
    output_dir: Path | None = None,
    data_root: Path | None = None,
    **executor,
):
    """The SimulationConfig of one (workload, seed) cell: what ``fedmask simulate`` runs for it
    (``tests/test_cli_parity.py`` checks that flags and config files express exactly this)."""
    from fedmask.simulator.config import SimulationConfig

    base, smoke = WORKLOADS[name]
    settings = {**base, **(smoke if quick else {})}
    return SimulationConfig(
        strategies=list(strategies or STRATEGIES),
        seed=seed,
        output_dir=output_dir
        if output_dir is not None
        else Path("runs/bench-accuracy") / name / f"seed-{seed}",
        data_root=data_root,
        transport="inproc",
        **settings,
        **executor,  # workers, backend, ray_address: where the cell's devices train
    )


def run_cell(config, threads: int) -> dict:
    """One (workload, seed) cell in a worker process; returns its results document."""
    import torch

    from fedmask.simulator.run import run_simulation

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    return run_simulation(config, progress=False)


def summarize(documents: list[dict]) -> dict[str, dict]:
    """Per method: mean, std and per-seed values of SUMMARY_KEYS, and the mean per-layer density."""
    methods: dict[str, dict] = {}
    for method in documents[0]["methods"]:
        runs = [d["methods"][method] for d in documents]
        entry: dict[str, Any] = {"seeds": [d["seed"] for d in documents]}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                entry[key] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
                entry[f"{key}_per_seed"] = values
        layers = runs[0].get("density_per_layer") or {}
        entry["density_per_layer"] = {
            k: statistics.fmean(
                r["density_per_layer"][k] for r in runs if k in r.get("density_per_layer", {})
            )
            for k in layers
        }
        entry["wall_s"] = sum(r["wall_s"] for r in runs)
        methods[method] = entry
    return methods


def table(summary: dict[str, dict]) -> str:
    head = (
        "| workload | method | accuracy | p10 | uplink bit/param | density | classifier density "
        "| compacted | TFLite speedup | dead-class devices |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, w in summary.items():
        for method, m in w["methods"].items():
            layers = m.get("density_per_layer") or {}
            classifier = f"{list(layers.values())[-1]:.2f}" if layers else "1.00"
            lines.append(
                f"| {name} | {method} | {m['accuracy_mean']:.3f} ± {m['accuracy_mean_std']:.3f} "
                f"| {m['accuracy_p10']:.3f} | {m['uplink_bits_per_param']:.2f} "
                f"| {m.get('density_mean', 1.0):.2f} | {classifier} "
                f"| {m.get('compacted_params_ratio', 1.0):.2f}x | {m.get('tflite_speedup', 1.0):.2f}x "
                f"| {m.get('dead_class_devices', 0):.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke size, one seed, under 3 minutes")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--jobs", type=int, default=2, help="(workload, seed) cells run in parallel")
    parser.add_argument("--out", default="runs/bench-accuracy", help="output directory")
    parser.add_argument("--data-root", help="data sets directory (default ../shared/datasets)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument(
        "--workers", type=int, help="each cell's devices train in this many processes (or Ray actors)"
    )
    parser.add_argument("--backend", default="local", choices=["local", "ray"], help="where workers run")
    parser.add_argument("--ray-address", help="Ray cluster to join (with --backend ray; then use --jobs 1)")
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="no runs: summarize the cells already in --out (e.g. after an interrupted run)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")

    out = Path(args.out)
    cells = [
        (
            name,
            seed,
            benchmark_config(
                name,
                quick=args.quick,
                seed=seed,
                strategies=args.strategies.split(","),
                output_dir=out / name / f"seed-{seed}",
                data_root=Path(args.data_root) if args.data_root else None,
                workers=args.workers,
                backend=args.backend,
                ray_address=args.ray_address,
            ),
        )
        for seed in seeds  # seed-major: every workload's first seed is done first
        for name in names
    ]
    started = time.perf_counter()
    documents: dict[str, list[dict]] = {name: [] for name in names}
    if args.summarize_only:
        for name, _seed, config in cells:
            path = Path(config.output_dir) / "results.json"
            if path.is_file():
                documents[name].append(json.loads(path.read_text()))
        names = [name for name in names if documents[name]]
    else:
        context = multiprocessing.get_context("spawn")  # no torch state shared with the workers
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=max(1, args.jobs), mp_context=context
        ) as pool:
            # Submitted workload by workload, so an interrupted run still has whole workloads to summarize.
            futures = {
                pool.submit(run_cell, config, args.threads): (name, seed) for name, seed, config in cells
            }
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                name, seed = futures[future]
                documents[name].append(future.result())
                logging.info(
                    "cell %d/%d done: %s seed %d (%.0fs)",
                    done,
                    len(cells),
                    name,
                    seed,
                    time.perf_counter() - started,
                )
    summary = {}
    for name in names:
        docs = sorted(documents[name], key=lambda d: d["seed"])
        summary[name] = {
            "dataset": docs[0]["dataset"],
            "partition": docs[0]["partition"],
            "devices": docs[0]["devices"],
            "rounds": docs[0]["rounds"],
            "config": {k: v for k, v in docs[0]["config"].items() if k not in ("seed", "output_dir")},
            "methods": summarize(docs),
        }
    result = {
        "quick": args.quick,
        "seeds": seeds,
        "cells": {name: [d["seed"] for d in documents[name]] for name in names},
        "wall_s": time.perf_counter() - started,
        "workloads": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(result, indent=2))
    rendered = table(summary)
    (out / "accuracy.md").write_text(rendered + "\n")
    print(rendered)
    print(f"total {result['wall_s']:.0f}s over seeds {seeds}; written {out / 'accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
