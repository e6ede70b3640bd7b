"""One simulation: load the workload, run each strategy on the chosen transport, write the report."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.report import write_report
from fedmask.simulator.results import MethodResult
from fedmask.strategies import TaskSpec, get_strategy

logger = logging.getLogger(__name__)


def task_spec(config: SimulationConfig, strategy: str, arch: str, num_classes: int) -> TaskSpec:
    hyper: dict[str, Any] = {"local_epochs": config.local_epochs, **config.hyper.get(strategy, {})}
    return TaskSpec(
        strategy=strategy,
        arch=arch,
        num_classes=num_classes,
        seed=config.seed,
        arch_kwargs=dict(config.arch_kwargs),
        mask_config=dict(config.mask_config),
        hyper=hyper,
    )


class ProgressBar:
    """One tqdm bar per strategy on stderr; silent when stderr is not a terminal unless forced."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        self.strategy: str | None = None

    def __call__(self, strategy: str, round_no: int, total: int, stats: dict) -> None:
        from tqdm import tqdm

        if self.bar is None or self.strategy != strategy:
            self.close()
            self.strategy = strategy
            self.bar = tqdm(
                total=total, desc=strategy, unit="round", disable=not self.enabled, file=sys.stderr
            )
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if v is not None})
        if not self.enabled:
            shown = " ".join(f"{k}={v:.3f}" for k, v in stats.items() if v is not None)
            logger.info("%s round %d/%d %s", strategy, round_no, total, shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_simulation(config: SimulationConfig, progress: bool | None = None) -> dict[str, Any]:
    from fedmask.datasets.workloads import WORKLOADS, load_workload

    t0 = time.perf_counter()
    data = load_workload(
        config.dataset,
        config.data_root,
        partition=config.partition,
        num_devices=config.devices,
        seed=config.seed,
        **config.dataset_kwargs,
    )
    arch = config.arch or WORKLOADS[config.dataset].architecture
    for index, device in enumerate(data.devices):  # what a device agent's --device-class says
        if config.device_classes:
            device.meta = {
                **device.meta,
                "device_class": config.device_classes[index % len(config.device_classes)],
            }
    logger.info(
        "loaded %s (%s): %d devices in %.1fs",
        config.dataset,
        data.partition,
        len(data.devices),
        time.perf_counter() - t0,
    )
    bar = ProgressBar(progress)
    methods: dict[str, MethodResult] = {}
    try:
        for strategy in config.strategies:
            spec = task_spec(config, strategy, arch, data.num_classes)
            # A strategy with no federated rounds has nothing to send: it runs in process on any transport.
            if config.transport == "inproc" or not get_strategy(strategy).federated:
                from fedmask.simulator.inproc import InProcessRun

                methods[strategy] = InProcessRun(config, data, spec).run(bar)
            elif config.transport == "mqtt":
                from fedmask.simulator.mqtt import MqttRun

                methods[strategy] = MqttRun(config, data, spec).run(bar)
            else:
                raise ValueError(f"unknown transport {config.transport!r}; choose inproc or mqtt")
    finally:
        bar.close()
        if config.backend == "ray":
            from fedmask.simulator.executors import stop_ray

            stop_ray()
    header = {
        "dataset": config.dataset,
        "partition": data.partition,
        "devices": len(data.devices),
        "rounds": config.rounds,
        "devices_per_round": config.devices_per_round or len(data.devices),
        "local_epochs": config.local_epochs,
        "arch": arch,
        "seed": config.seed,
        "transport": config.transport,
        "config": config.to_dict(),
    }
    return write_report(config.output_dir, header, methods)
