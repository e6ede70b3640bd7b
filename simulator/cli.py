"""`fedmask simulate`: a federated run on one machine, in process or over an embedded MQTT broker."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedmask.config import ConfigError, add_option


def _parse_hyper(items: list[str] | dict | None) -> dict[str, dict[str, Any]]:
    """``strategy.key=value`` pairs (flags) or a nested mapping (config file) into per-strategy dicts."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): dict(v) for k, v in items.items()}
    hyper: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        strategy, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--hyper {item!r}: expected STRATEGY.KEY=VALUE, e.g. fedmask.lr=0.1")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        hyper.setdefault(strategy, {})[name] = value
    return hyper


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated simulation (embedded MQTT broker by default, or in process)",
        description="Run strategies on a partitioned data set and write results.json, results.md and plots.",
    )
    add_option(p, "--dataset", default="hmp", help="workload: hmp, fashion_mnist, shakespeare, ...")
    add_option(p, "--partition", help="natural, shards, dirichlet, iid (default: the workload's own)")
    add_option(p, "--devices", type=int, help="number of devices (default: the workload's own)")
    add_option(p, "--devices-per-round", type=int, help="participants per round (default: all)")
    add_option(p, "--rounds", type=int, default=10, help="federated rounds")
    add_option(p, "--local-epochs", type=int, default=1, help="local epochs per round")
    add_option(
        p,
        "--strategy",
        default="fedmask",
        help="comma-separated strategies: fedmask, fedavg, fedavg_ft, local, topk, bnn, perfedavg, "
        "perfedavg_hf, lgfedavg, fedpm",
    )
    add_option(p, "--seed", type=int, default=0, help="seed for weights, partition and sampling")
    add_option(p, "--output-dir", default="runs/latest", help="where results.json, results.md and PNGs go")
    add_option(p, "--data-root", help="directory holding the data sets (default: ../shared/datasets)")
    add_option(p, "--arch", help="model architecture (default: the workload's own)")
    add_option(p, "--eval-every", type=int, default=1, help="evaluate all devices every N rounds")
    add_option(p, "--max-payload", type=int, default=128 * 1024, help="largest MQTT payload in bytes")
    add_option(p, "--transport", default="mqtt", choices=["inproc", "mqtt"], help="message transport")
    add_option(
        p,
        "--threads",
        type=int,
        default=1,
        help="torch threads per training (1 avoids oversubscribing small models)",
    )
    add_option(
        p,
        "--hyper",
        action="append",
        metavar="S.K=V",
        help="hyperparameter, e.g. fedmask.lr=0.1 (config file: a mapping strategy -> {key: value})",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedmask.simulator.config import SimulationConfig
    from fedmask.simulator.report import markdown_table
    from fedmask.simulator.run import run_simulation

    config = SimulationConfig(
        dataset=args.dataset,
        partition=args.partition,
        devices=args.devices,
        devices_per_round=args.devices_per_round,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        strategies=[s.strip() for s in str(args.strategy).split(",") if s.strip()],
        seed=args.seed,
        output_dir=Path(args.output_dir),
        data_root=Path(args.data_root) if args.data_root else None,
        arch=args.arch,
        hyper=_parse_hyper(args.hyper),
        eval_every=args.eval_every,
        max_payload=args.max_payload,
        transport=args.transport,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    document = run_simulation(config, progress=args.progress)
    print(markdown_table(document))
    print(f"results in {config.output_dir}/ (results.json, results.md, accuracy.png, uplink.png)")
    return 0
