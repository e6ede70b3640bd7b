"""`fedmask simulate`: a federated run on one machine, in process or over an embedded MQTT broker.

Every field of ``SimulationConfig`` has a flag and a config-file key. The mappings take repeatable
``KEY=VALUE`` flags (VALUE read as JSON when it parses, else as text) or a mapping in the file:

    --arch-option width=0.5       arch_kwargs: {width: 0.5}
    --data-option alpha=0.3       dataset_kwargs: {alpha: 0.3}
    --mask-option granularity=unit   mask_config: {granularity: unit}
    --hyper fedmask.lr=0.1        hyper: {fedmask: {lr: 0.1}}

Flags, ``FEDMASK_<KEY>`` (a JSON object) and the file's mappings merge key by key, the flag winning.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmask.config import ConfigError, add_option, key_value_mapping, parse_json_or_text


def _parse_hyper(items: Any, where: str = "--hyper") -> dict[str, dict[str, Any]]:
    """``strategy.key=value`` pairs (flags), a nested mapping (config file) or JSON (environment)."""
    if not items:
        return {}
    if isinstance(items, str):
        parsed = parse_json_or_text(items)
        items = parsed if isinstance(parsed, dict) else [items]
    if isinstance(items, dict):
        hyper: dict[str, dict[str, Any]] = {}
        for strategy, values in items.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{where}: {strategy!r} must map hyperparameter names to values "
                    f"(hyper: {{{strategy}: {{lr: 0.1}}}}), got {values!r}"
                )
            hyper[str(strategy)] = {str(k).replace("-", "_"): v for k, v in values.items()}
        return hyper
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a mapping strategy -> {{key: value}}, got {items!r}")
    hyper = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        strategy, dot, name = key.partition(".")
        if not sep or not dot or not strategy or not name:
            raise ConfigError(f"--hyper {item!r}: expected STRATEGY.KEY=VALUE, e.g. --hyper fedmask.lr=0.1")
        hyper.setdefault(strategy.strip(), {})[name.strip().replace("-", "_")] = parse_json_or_text(raw)
    return hyper


def _mapping(flag: str):
    def parse(raw: Any, where: str) -> dict[str, Any]:
        return key_value_mapping(raw, where, flag)

    return parse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated simulation (embedded MQTT broker by default, or in process)",
        description="Run strategies on a partitioned data set and write results.json, results.md and plots. "
        "Every option is also a config-file key (see docs/examples/simulate.yaml).",
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
        "perfedavg_hf, lgfedavg, fedpm (config file: a list or a comma-separated string)",
    )
    add_option(p, "--seed", type=int, default=0, help="seed for weights, partition and sampling")
    add_option(p, "--output-dir", default="runs/latest", help="where results.json, results.md and PNGs go")
    add_option(p, "--data-root", help="directory holding the data sets (default: ../shared/datasets)")
    add_option(p, "--arch", help="model architecture (default: the workload's own)")
    add_option(
        p,
        "--arch-option",
        dest="arch_kwargs",
        action="append",
        metavar="KEY=VALUE",
        merge=_mapping("--arch-option"),
        help="architecture option, e.g. width=0.5 (repeatable; config file: arch_kwargs mapping)",
    )
    add_option(
        p,
        "--data-option",
        dest="dataset_kwargs",
        action="append",
        metavar="KEY=VALUE",
        merge=_mapping("--data-option"),
        help="workload loader/partition option, e.g. shard_size=300, alpha=0.3, max_train_per_speaker=400 "
        "(repeatable; config file: dataset_kwargs mapping)",
    )
    add_option(
        p,
        "--mask-option",
        dest="mask_config",
        action="append",
        metavar="KEY=VALUE",
        merge=_mapping("--mask-option"),
        help="mask option, e.g. granularity=unit, masked_layers='[\"fc*\"]', score_init=1.0 "
        "(repeatable; config file: mask_config mapping)",
    )
    add_option(p, "--eval-every", type=int, default=1, help="evaluate all devices every N rounds")
    add_option(p, "--max-payload", type=int, default=128 * 1024, help="largest MQTT payload in bytes")
    add_option(p, "--transport", default="mqtt", choices=["inproc", "mqtt"], help="message transport")
    add_option(
        p,
        "--agent-processes",
        type=int,
        default=0,
        metavar="N",
        help="--transport mqtt: OS processes the device agents run in (0: one per 100 agents)",
    )
    add_option(p, "--fleet", default="sim", help="fleet name of the run's topics and store rows")
    add_option(
        p,
        "--device-classes",
        help="device classes assigned round-robin, e.g. pi_zero,jetson (each may get its own budget: "
        "--hyper fedmask.unit_keep_by_class='{\"pi_zero\": 0.25}')",
    )
    add_option(
        p,
        "--mask-codings",
        default="bits,mctx",
        help="mask codings the simulated parties decode: bits (version 1) alone, or bits,mctx (masks coded "
        "against what both sides hold)",
    )
    add_option(
        p,
        "--tflite-devices",
        type=int,
        default=8,
        help="devices whose final model's TFLite latency (dense vs compacted) is measured; 0: none",
    )
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
        merge=lambda raw, where: _parse_hyper(raw, where),
        help="hyperparameter, e.g. fedmask.lr=0.1 (repeatable; config file: a mapping strategy -> "
        "{key: value})",
    )
    add_option(p, "--progress", action=argparse.BooleanOptionalAction, help="progress bar")
    p.set_defaults(handler=run)


def _strategies(value: Any) -> list[str]:
    items = [str(s) for s in value] if isinstance(value, (list, tuple)) else str(value).split(",")
    return [s.strip() for s in items if s.strip()]


def simulation_config(args: argparse.Namespace) -> Any:
    """The ``SimulationConfig`` that resolved ``args`` describe, validated (``ConfigError`` if not)."""
    from fedmask.simulator.config import SimulationConfig, validate

    config = SimulationConfig(
        dataset=args.dataset,
        partition=args.partition,
        devices=args.devices,
        devices_per_round=args.devices_per_round,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        strategies=_strategies(args.strategy),
        seed=args.seed,
        output_dir=Path(args.output_dir),
        data_root=Path(args.data_root) if args.data_root else None,
        arch=args.arch,
        arch_kwargs=dict(args.arch_kwargs or {}),
        hyper=_parse_hyper(args.hyper),
        mask_config=dict(args.mask_config or {}),
        dataset_kwargs=dict(args.dataset_kwargs or {}),
        eval_every=args.eval_every,
        max_payload=args.max_payload,
        transport=args.transport,
        agent_processes=args.agent_processes or None,
        fleet=args.fleet,
        device_classes=_strategies(args.device_classes) if args.device_classes else [],
        tflite_devices=args.tflite_devices,
        mask_codings=_strategies(args.mask_codings),
    )
    return validate(config)


def run(args: argparse.Namespace) -> int:
    from fedmask.simulator.report import markdown_table
    from fedmask.simulator.run import run_simulation

    config = simulation_config(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    document = run_simulation(config, progress=args.progress)
    print(markdown_table(document))
    print(f"results in {config.output_dir}/ (results.json, results.md, accuracy.png, uplink.png)")
    return 0
