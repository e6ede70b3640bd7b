"""What a simulation run is: data, partition, fleet size, schedule, strategies.

``validate`` checks a config before any data are loaded, against what the code declares: workload,
partition and architecture names against their registries, ``arch_kwargs`` against the architecture's
constructor signature, ``mask_config`` against ``MaskConfig``'s fields (and values), ``dataset_kwargs``
against the workload loader's keywords, and strategy names. Errors are ``ConfigError`` naming the key
and the closest valid one.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmask.config import ConfigError, check_arch_kwargs, check_mask_config, suggest, unknown_key_error

DEFAULT_MAX_PAYLOAD = 128 * 1024
TRANSPORTS = ("inproc", "mqtt")

logger = logging.getLogger(__name__)


@dataclass
class SimulationConfig:
    dataset: str = "hmp"
    partition: str | None = None  # None: the workload's natural/default partition
    devices: int | None = None  # None: the workload's default fleet size
    devices_per_round: int | None = None  # None: every device every round
    rounds: int = 10
    local_epochs: int = 1
    strategies: list[str] = field(default_factory=lambda: ["fedmask"])
    seed: int = 0
    output_dir: Path = Path("runs/latest")
    data_root: Path | None = None
    arch: str | None = None  # None: the workload's default architecture
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    hyper: dict[str, dict[str, Any]] = field(default_factory=dict)  # strategy name -> overrides
    mask_config: dict[str, Any] = field(default_factory=dict)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 1
    max_payload: int = DEFAULT_MAX_PAYLOAD
    transport: str = "inproc"
    agent_processes: int | None = None  # mqtt transport: None: one process per ~100 agents
    # Mask codings the simulated parties decode: "bits" alone is the version-1 coding; with "mctx"
    # masks travel coded against the bases both sides hold (protocol.mask_coding).
    mask_codings: list[str] = field(default_factory=lambda: ["bits", "mctx"])
    # Device classes assigned round-robin over the devices (e.g. ["pi_zero", "jetson"]): a strategy
    # may give each class its own budget (FedMask's hyper unit_keep_by_class). Empty: no classes.
    device_classes: list[str] = field(default_factory=list)
    tflite_devices: int = 8  # devices whose final model's TFLite latency is measured (0: none)
    fleet: str = "sim"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["data_root"] = str(self.data_root) if self.data_root else None
        return d


# -- validation -----------------------------------------------------------------------------------------


def _keywords(fn: Callable[..., Any], drop: tuple[str, ...] = ()) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {
        p.name
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is not p.empty
        and p.name not in drop
    }


def dataset_options(dataset: str) -> set[str] | None:
    """Keywords the workload's loader passes on (None: this loader is not known, nothing is checked).

    Read from the signatures of the functions each loader forwards its keywords to, so a keyword added
    to one of them is accepted without touching this module.
    """
    from fedmask.datasets import workloads
    from fedmask.datasets.synthetic import SYNTHETIC_PARTITIONS, federate_central, split_train

    workload = workloads.WORKLOADS[dataset]
    loader = getattr(workload.loader, "__qualname__", "")
    if loader.startswith("_hmp"):
        from fedmask.datasets.hmp import load_hmp

        return _keywords(load_hmp, ("seed",))
    if loader.startswith("_shakespeare"):
        from fedmask.datasets.shakespeare import load_shakespeare

        return _keywords(load_shakespeare, ("seed", "max_speakers"))
    if loader.startswith("_uci_har"):
        from fedmask.datasets.uci_har import load_uci_har

        return _keywords(load_uci_har)
    if loader.startswith("_leaf"):
        from fedmask.datasets.leaf import load_leaf

        return _keywords(load_leaf, ("max_users",))
    if workload.partitions == SYNTHETIC_PARTITIONS and (
        loader.startswith("_idx") or loader.startswith("_cifar10")
    ):
        options = _keywords(federate_central, ("seed", "meta")) | _keywords(split_train, ("seed",))
        if loader.startswith("_idx"):
            options.add("emnist_split")
        return options
    return None


def check_dataset_kwargs(dataset: str, kwargs: dict[str, Any], where: str = "data option") -> None:
    valid = dataset_options(dataset)
    if valid is None:
        return
    for key in kwargs:
        if key not in valid:
            raise unknown_key_error(f"{where} for {dataset}", key, valid, what="option")


def check_hyper(hyper: dict[str, dict[str, Any]], where: str = "hyper") -> None:
    """Strategy names must exist; keys a strategy does not declare a default for are passed on with a
    warning (strategies also read optional keys without a default, e.g. topk's ``k``)."""
    from fedmask.strategies import registry
    from fedmask.strategies.base import DEFAULT_HYPER

    strategies = registry()
    for name, values in hyper.items():
        if name not in strategies:
            raise unknown_key_error(where, name, strategies, what="strategy")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {name} must map hyperparameter names to values, got {values!r}")
        declared = set(DEFAULT_HYPER) | set(strategies[name].defaults)
        for key in values:
            if key not in declared:
                logger.warning(
                    "%s: %s.%s has no default in %s (passed on as given)%s",
                    where,
                    name,
                    key,
                    name,
                    suggest(key, declared),
                )


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")


def validate(config: SimulationConfig) -> SimulationConfig:
    """Raise ``ConfigError`` for anything in ``config`` that the run would trip over later."""
    from fedmask.datasets.workloads import WORKLOADS
    from fedmask.strategies import registry

    if config.dataset not in WORKLOADS:
        raise unknown_key_error("--dataset", config.dataset, WORKLOADS, what="workload")
    workload = WORKLOADS[config.dataset]
    if config.partition is not None and config.partition not in workload.partitions:
        raise ConfigError(
            f"--partition {config.partition!r}: workload {config.dataset} supports "
            f"{', '.join(workload.partitions)}{suggest(config.partition, workload.partitions)}"
        )
    _positive_int("--devices", config.devices, allow_none=True)
    _positive_int("--devices-per-round", config.devices_per_round, allow_none=True)
    _positive_int("--rounds", config.rounds)
    _positive_int("--local-epochs", config.local_epochs)
    _positive_int("--eval-every", config.eval_every)
    _positive_int("--max-payload", config.max_payload)
    _positive_int("--agent-processes", config.agent_processes, allow_none=True)
    if config.transport not in TRANSPORTS:
        raise ConfigError(f"--transport {config.transport!r}: expected one of {', '.join(TRANSPORTS)}")
    from fedmask.protocol.mask_coding import FULL, MASK_CODINGS

    unknown = [c for c in config.mask_codings if c not in MASK_CODINGS]
    if unknown or FULL not in config.mask_codings:
        raise ConfigError(
            f"mask_codings must include {FULL!r} and only {list(MASK_CODINGS)}, got {config.mask_codings}"
        )
    if not config.strategies:
        raise ConfigError("--strategy: name at least one strategy")
    strategies = registry()
    for name in config.strategies:
        if name not in strategies:
            raise unknown_key_error("--strategy", name, strategies, what="strategy")
    arch = config.arch or workload.architecture
    check_arch_kwargs(arch, config.arch_kwargs)
    check_mask_config(config.mask_config)
    check_dataset_kwargs(config.dataset, config.dataset_kwargs)
    check_hyper(config.hyper)
    return config
