"""Learning-rate tuning for the comparison benchmark: held-out device data, the same budget for every method.

Each device's training data is split once into a training part and a validation part (``VAL_FRACTION``,
seeded per device); tuning runs train on the first and score on the second, so no test sample is ever
seen while choosing. Every method gets the same budget: ``len(LR_FACTORS)`` short runs (the same
fraction of the benchmark's rounds, on the same subset of devices, with the same seeds and local
epochs), each with its default learning rate times one factor; the best validation accuracy wins, the
default on ties.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedmask.datasets.federated import DeviceData, FederatedDataset
from fedmask.simulator.config import SimulationConfig
from fedmask.strategies.training import derive_seed

logger = logging.getLogger(__name__)

VAL_FRACTION = 0.2
LR_FACTORS = (1.0, 1 / 3, 3.0)  # default first: it wins ties
# The centre of each method's grid: the learning rate the strategy uses when none is given.
DEFAULT_LR = {
    "fedmask": 0.1,
    "fedavg": 0.05,
    "fedavg_ft": 0.05,
    "local": 0.05,
    "topk": 0.05,
    "bnn": 0.01,
    "perfedavg": 0.05,
    "perfedavg_hf": 0.05,
    "lgfedavg": 0.05,
    "fedpm": 0.1,
}

# Runs one method on (config, data, extra hyper) and returns its validation accuracy and the result.
RunMethod = Callable[[SimulationConfig, FederatedDataset, str, dict[str, Any]], Any]


def validation_split(
    data: FederatedDataset, seed: int, fraction: float = VAL_FRACTION, max_devices: int | None = None
) -> FederatedDataset:
    """The federation with each device's test set replaced by a slice of its own training data.

    ``max_devices`` keeps a seeded random subset of the devices (tuning runs are short, and the cost
    of finalizing every device would dominate them). A device keeps at least one training sample;
    one with a single sample gets an empty validation set.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    chosen = data.devices
    if max_devices is not None and max_devices < len(chosen):
        rng = np.random.default_rng(derive_seed(seed, "tuning-devices"))
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), size=max_devices, replace=False))]
    devices = []
    for device in chosen:
        n = device.num_train
        rng = np.random.default_rng(derive_seed(seed, device.device_id, "validation"))
        order = rng.permutation(n)
        held = min(n - 1, math.ceil(fraction * n)) if n > 1 else 0
        val, train = np.sort(order[:held]), np.sort(order[held:])
        devices.append(
            DeviceData(
                device_id=device.device_id,
                x_train=device.x_train[train],
                y_train=device.y_train[train],
                x_test=device.x_train[val],
                y_test=device.y_train[val],
                num_classes=device.num_classes,
                meta=device.meta,
            )
        )
    return replace(data, devices=devices)


def tuning_rounds(rounds: int, fraction: float) -> int:
    return max(1, round(rounds * fraction))


def learning_rate_grid(method: str) -> list[float]:
    if method not in DEFAULT_LR:
        raise ValueError(f"no default learning rate recorded for {method!r}; add it to DEFAULT_LR")
    return [DEFAULT_LR[method] * f for f in LR_FACTORS]


@dataclass
class TuningResult:
    method: str
    lr: float
    grid: list[float]
    val_accuracy: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "grid": self.grid, "val_accuracy": self.val_accuracy}


def tune_method(
    method: str,
    config: SimulationConfig,
    val_data: FederatedDataset,
    linked_hyper: dict[str, Any],
    run_method: RunMethod,
) -> tuple[TuningResult, Any]:
    """Try each learning rate of the grid on the validation federation; returns the choice and its run."""
    grid = learning_rate_grid(method)
    scores, runs = [], []
    for lr in grid:
        result = run_method(config, val_data, method, {**linked_hyper, "lr": lr})
        scores.append(result.accuracy_mean())
        runs.append(result)
        logger.info("tuning %s lr=%.4g: validation accuracy %.4f", method, lr, scores[-1])
    best = int(np.argmax(scores))  # first maximum: the default wins ties
    return TuningResult(method, grid[best], grid, scores), runs[best]


def load_choices(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Saved choices: ``{workload: {method: {"lr": ..., ...}}}``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved tuning choices; run once without --no-tune")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("workloads"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'workloads' mapping")
    return data["workloads"]


def chosen_lr(choices: dict[str, dict[str, dict[str, Any]]], workload: str, method: str, path: Path) -> float:
    try:
        return float(choices[workload][method]["lr"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: no learning rate for workload {workload!r}, method {method!r}; re-run the tuning"
        ) from exc
