#!/usr/bin/env python3
"""Comparison benchmark: FedMask against the paper's baselines, on our data, partitions and budgets.

Runs every method (fedmask, fedavg, fedavg_ft, local, topk, bnn, perfedavg, lgfedavg, fedpm) on the
accuracy benchmark's workloads (HMP by volunteer, Fashion-MNIST pathological, Shakespeare by speaker)
with the same seed, partition, rounds and local epochs for all, in process, every message really
encoded (traffic is counted from encoded bytes). Before the measured runs each method's learning rate
is tuned on validation data carved from the devices' own training data, with the same budget for all
(see tuning.py). Top-K is set to FedMask's measured uplink bits per parameter in the same run, so the
two compare at equal uplink; FedPM resets its Beta posterior every 1 / (participation rate) rounds.

    python benchmarks/compare.py                 # default size (< 60 min on 2 idle cores)
    python benchmarks/compare.py --quick         # smoke size (< 5 min)
    python benchmarks/compare.py --no-tune       # reuse <out>/tuning.json
    python benchmarks/compare.py --workers 2     # each round's devices in 2 processes (same results)

Writes <out>/compare.json, <out>/compare.md, <out>/accuracy_vs_traffic.png, <out>/device_accuracy.png,
<out>/tuning.json; prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accuracy import WORKLOADS
from compare_report import markdown, plot_accuracy_vs_traffic, plot_device_accuracy
from flops import dtype_name, train_macs_per_example
from tuning import DEFAULT_LR, chosen_lr, load_choices, tune_method, tuning_rounds, validation_split

from fedmask.datasets.federated import FederatedDataset
from fedmask.datasets.workloads import WORKLOADS as DATA_WORKLOADS
from fedmask.datasets.workloads import load_workload
from fedmask.models import WeightMode
from fedmask.protocol import messages
from fedmask.protocol.chunking import wire_size
from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.inproc import InProcessRun
from fedmask.simulator.results import MethodResult
from fedmask.simulator.run import task_spec
from fedmask.strategies.model_factory import build_for

logger = logging.getLogger("compare")

METHODS = ["fedmask", "fedavg", "fedavg_ft", "local", "topk", "bnn", "perfedavg", "lgfedavg", "fedpm"]
BASELINE = "fedavg"  # ratios in the report are against this method, measured in the same run
# Gradient evaluations per training sample relative to one forward + backward pass: Per-FedAvg HF
# computes four gradients for every three minibatches (inner, outer and the two Hessian probes).
GRADIENT_PASSES = {"perfedavg_hf": 4 / 3}

# Nine methods plus their tuning must fit the time budget in which the accuracy benchmark runs four.
# Fashion-MNIST dominates (20 devices x 2 local epochs per round, and FedMask and FedAvg-FT fine-tune
# all 100 devices at the end), so here its devices hold 2 shards of 150 images instead of 300, and the
# smoke size also shrinks the fleet. The same settings hold for every method.
DEFAULT_SIZE: dict[str, dict[str, Any]] = {"fashion_mnist": {"dataset_kwargs": {"shard_size": 150}}}
QUICK_SIZE: dict[str, dict[str, Any]] = {
    "fashion_mnist": {"devices": 6, "devices_per_round": 3, "dataset_kwargs": {"shard_size": 150}},
}
TUNE_DEVICES = {"default": 20, "quick": 4}  # tuning runs use at most this many devices


def workload_config(name: str, quick: bool, args: argparse.Namespace) -> SimulationConfig:
    """The accuracy benchmark's settings for ``name`` (its --quick overrides when quick), then ours."""
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    base, quick_overrides = WORKLOADS[name]
    layers = [base, quick_overrides if quick else {}, (QUICK_SIZE if quick else DEFAULT_SIZE).get(name, {})]
    settings: dict[str, Any] = {}
    loader_options: dict[str, Any] = {}
    for layer in layers:
        settings.update({k: v for k, v in layer.items() if k != "dataset_kwargs"})
        loader_options.update(layer.get("dataset_kwargs", {}))
    settings["dataset_kwargs"] = loader_options
    return SimulationConfig(
        strategies=list(args.methods),
        seed=args.seed,
        output_dir=args.out / name,
        data_root=args.data_root,
        transport="inproc",
        workers=args.workers,
        backend=args.backend,
        ray_address=args.ray_address,
        **settings,
    )


def load_data(config: SimulationConfig) -> tuple[FederatedDataset, str]:
    data = load_workload(
        config.dataset,
        config.data_root,
        partition=config.partition,
        num_devices=config.devices,
        seed=config.seed,
        **config.dataset_kwargs,
    )
    return data, config.arch or DATA_WORKLOADS[config.dataset].architecture


def run_method(
    config: SimulationConfig, data: FederatedDataset, method: str, hyper: dict[str, Any], arch: str
) -> MethodResult:
    """One method on one federation through the in-process transport (every message encoded)."""
    run_config = dataclasses.replace(config, hyper={**config.hyper, method: dict(hyper)})
    spec = task_spec(run_config, method, arch, data.num_classes)
    return InProcessRun(run_config, data, spec).run()


TOPK_METRICS = ("loss", "train_accuracy", "sent_fraction")  # what a Top-K update reports


def envelope_bits_per_param(
    config: SimulationConfig, data: FederatedDataset, params: int, metrics: tuple[str, ...] = TOPK_METRICS
) -> float:
    """Wire bits per parameter of an update's envelope alone (ids, round, metrics; empty body)."""
    update = messages.Update(
        fleet=config.fleet,
        task_id=f"{config.fleet}-topk-{config.seed}",
        device=max((d.device_id for d in data.devices), key=len),
        round=config.rounds,
        base_round=config.rounds,
        num_samples=max(d.num_train for d in data.devices),
        metrics=dict.fromkeys(metrics, 0.5),
        body={},
    )
    return 8 * wire_size(update, config.max_payload) / params


def linked_hyper(method: str, config: SimulationConfig, data: FederatedDataset, fedmask: MethodResult | None):
    """Settings that follow from the run itself rather than from tuning.

    Top-K gets FedMask's measured uplink minus the envelope, so that its whole message, envelope
    included, costs what FedMask's did.
    """
    if method == "topk" and fedmask is not None:
        envelope = envelope_bits_per_param(config, data, fedmask.params_per_update)
        return {"target_bits_per_param": max(1e-3, fedmask.uplink_bits_per_param() - envelope)}
    if method == "fedpm":
        per_round = config.devices_per_round or len(data.devices)
        return {"reset_every": math.ceil(len(data.devices) / per_round)}
    return {}


def ordered(methods: list[str]) -> list[str]:
    """FedMask first: Top-K's bit budget is FedMask's measured uplink."""
    return sorted(methods, key=lambda m: m != "fedmask")


def local_cost(
    result: MethodResult, data: FederatedDataset, method: str, epochs: int, macs_per_example: int
) -> dict[str, float]:
    """Median seconds of local training per device and round, and the MAC/FLOP estimate of one."""
    per_device = [
        r.timings.get("train_device_s", r.timings.get("train", 0.0)) / len(r.participants)
        for r in result.rounds
        if r.participants
    ]
    train_sizes = {d.device_id: d.num_train for d in data.devices}
    samples = [train_sizes[p] for r in result.rounds for p in r.participants]
    macs = statistics.fmean(samples) * epochs * macs_per_example * GRADIENT_PASSES.get(method, 1.0)
    return {
        "train_s_per_round": statistics.median(per_device) if per_device else 0.0,
        "train_macs_per_round": macs,
        "train_gflops_per_round": 2 * macs / 1e9,
    }


def method_summary(result: MethodResult) -> dict[str, Any]:
    summary = {k: v for k, v in result.summary().items() if k not in ("rounds", "devices")}
    cumulative, total = [], 0
    for r in result.rounds:
        total += r.uplink_bytes + r.downlink_bytes
        cumulative.append(total)
    summary["cumulative_bytes"] = cumulative
    summary["round_accuracy"] = [r.accuracy_mean for r in result.rounds]
    summary["device_accuracy"] = [d.accuracy for d in result.devices]
    return summary


def add_ratios(methods: dict[str, dict[str, Any]]) -> None:
    """Traffic reduction and accuracy difference against the baseline of the same run."""
    base = methods.get(BASELINE)
    if base is None:
        return
    for m in methods.values():
        m["uplink_reduction_vs_fedavg"] = base["uplink_bytes_total"] / max(1, m["uplink_bytes_total"])
        m["downlink_reduction_vs_fedavg"] = base["downlink_bytes_total"] / max(1, m["downlink_bytes_total"])
        m["accuracy_gain_vs_fedavg"] = m["accuracy_mean"] - base["accuracy_mean"]


def tune_workload(
    name: str,
    config: SimulationConfig,
    data: FederatedDataset,
    arch: str,
    methods: list[str],
    budget: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    val_data = validation_split(data, config.seed, max_devices=budget.tune_devices)
    tune_config = dataclasses.replace(
        config,
        rounds=tuning_rounds(config.rounds, budget.tune_fraction),
        devices_per_round=min(config.devices_per_round or len(val_data.devices), len(val_data.devices)),
        eval_every=0,  # only the final (finalized) validation accuracy counts
    )
    choices: dict[str, dict[str, Any]] = {}
    fedmask_run = None
    for method in ordered(methods):
        t0 = time.perf_counter()
        choice, best_run = tune_method(
            method,
            tune_config,
            val_data,
            linked_hyper(method, tune_config, val_data, fedmask_run),
            lambda c, d, m, h: run_method(c, d, m, h, arch),
        )
        if method == "fedmask":
            fedmask_run = best_run
        choices[method] = {
            **choice.to_dict(),
            "rounds": tune_config.rounds,
            "seconds": time.perf_counter() - t0,
        }
        logger.info("%s: %s tuned to lr=%.4g in %.0fs", name, method, choice.lr, choices[method]["seconds"])
    return choices


def run_workload(
    name: str, config: SimulationConfig, data: FederatedDataset, arch: str, lrs: dict[str, float]
) -> dict[str, Any]:
    model = build_for(task_spec(config, "fedavg", arch, data.num_classes), WeightMode.DENSE)
    macs = train_macs_per_example(model, data.input_shape, dtype_name(data.input_dtype))
    methods: dict[str, dict[str, Any]] = {}
    fedmask_run = None
    for method in ordered(list(config.strategies)):
        hyper = {"lr": lrs[method], **linked_hyper(method, config, data, fedmask_run)}
        result = run_method(config, data, method, hyper, arch)
        if method == "fedmask":
            fedmask_run = result
        methods[method] = {
            **method_summary(result),
            **local_cost(result, data, method, config.local_epochs, macs),
            "lr": lrs[method],
            "hyper": hyper,
        }
        logger.info(
            "%s: %s accuracy %.3f, uplink %.3f bits/param, %.0fs",
            name,
            method,
            result.accuracy_mean(),
            result.uplink_bits_per_param(),
            result.wall_s,
        )
    add_ratios(methods)
    return {
        "dataset": config.dataset,
        "partition": data.partition,
        "devices": len(data.devices),
        "devices_per_round": config.devices_per_round or len(data.devices),
        "rounds": config.rounds,
        "local_epochs": config.local_epochs,
        "arch": arch,
        "arch_kwargs": config.arch_kwargs,
        "params": model.num_parameters,
        "train_macs_per_example": macs,
        "methods": {m: methods[m] for m in config.strategies},  # in the order asked for
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke size, under 5 minutes")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-compare"), help="output directory")
    parser.add_argument("--data-root", type=Path, help="data sets directory (default ../shared/datasets)")
    parser.add_argument("--no-tune", action="store_true", help="reuse the learning rates in --tuning-file")
    parser.add_argument("--tuning-file", type=Path, help="saved tuning choices (default <out>/tuning.json)")
    parser.add_argument(
        "--tune-fraction", type=float, default=0.2, help="tuning runs last this fraction of the rounds"
    )
    parser.add_argument(
        "--tune-devices",
        type=int,
        help=f"tuning runs use at most this many devices (default {TUNE_DEVICES['default']}, "
        f"{TUNE_DEVICES['quick']} with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these small models run fastest single-threaded on a shared CPU)",
    )
    parser.add_argument(
        "--workers", type=int, help="devices of a round train in this many processes (or Ray actors)"
    )
    parser.add_argument("--backend", default="local", choices=["local", "ray"], help="where workers run")
    parser.add_argument("--ray-address", help="Ray cluster to join (with --backend ray)")
    parser.add_argument("--figures-dir", type=Path, help="also copy the PNGs here (e.g. docs/results)")
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in DEFAULT_LR]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(DEFAULT_LR)}")
    args.tuning_file = args.tuning_file or args.out / "tuning.json"
    if args.tune_devices is None:
        args.tune_devices = TUNE_DEVICES["quick" if args.quick else "default"]
    if not 0 < args.tune_fraction <= 1:
        parser.error(f"--tune-fraction must be in (0, 1], got {args.tune_fraction}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        saved = load_choices(args.tuning_file) if args.no_tune else None
        saved_lrs = {
            name: {m: chosen_lr(saved, name, m, args.tuning_file) for m in args.methods}
            for name in (args.workloads if saved is not None else [])
        }
    except (OSError, ValueError) as exc:  # fail before any run, naming the file and the missing entry
        raise SystemExit(f"compare: {exc}") from None
    tuning: dict[str, dict[str, Any]] = {}
    workloads: dict[str, Any] = {}
    for name in args.workloads:
        config = workload_config(name, args.quick, args)
        data, arch = load_data(config)
        if saved is None:
            tuning[name] = tune_workload(name, config, data, arch, args.methods, args)
            lrs = {m: tuning[name][m]["lr"] for m in args.methods}
        else:
            tuning[name] = {m: saved[name][m] for m in args.methods}
            lrs = saved_lrs[name]
        workloads[name] = run_workload(name, config, data, arch, lrs)

    args.out.mkdir(parents=True, exist_ok=True)
    if saved is None:
        record = {
            "seed": args.seed,
            "quick": args.quick,
            "tune_fraction": args.tune_fraction,
            "tune_devices": args.tune_devices,
            "workloads": tuning,
        }
        args.tuning_file.write_text(json.dumps(record, indent=2))
    document = {
        "command": " ".join(
            ["python", "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": args.quick,
        "seed": args.seed,
        "threads": args.threads,
        "tuned_now": saved is None,
        "tune_fraction": args.tune_fraction,
        "tune_devices": args.tune_devices,
        "wall_s": time.perf_counter() - started,
        "tuning": tuning,
        "workloads": workloads,
    }
    (args.out / "compare.json").write_text(json.dumps(document, indent=2))
    table = markdown(document)
    (args.out / "compare.md").write_text(table)
    figures = [
        plot_accuracy_vs_traffic(document, args.out / "accuracy_vs_traffic.png"),
        plot_device_accuracy(document, args.out / "device_accuracy.png"),
    ]
    if args.figures_dir:
        args.figures_dir.mkdir(parents=True, exist_ok=True)
        for figure in figures:
            shutil.copy(figure, args.figures_dir / figure.name)
    print(table)
    print(
        f"total {document['wall_s'] / 60:.1f} min; written {args.out / 'compare.json'}, compare.md and PNGs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
