"""The strategy contract: a client half and a server half that exchange coded bodies.

A *body* is ``dict[str, Coded]`` on the way out (each array names its wire coding, see
``protocol.tensor_codec``) and ``dict[str, np.ndarray]`` once decoded. The halves never see a transport:
the in-process simulator and the MQTT deployment both encode bodies into the same messages, so a strategy
runs on either without special cases.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedmask.protocol.tensor_codec import Coded

Body = dict[str, Coded]
DecodedBody = dict[str, np.ndarray]

DEFAULT_HYPER: dict[str, Any] = {
    "lr": 0.01,  # local learning rate (optimizer is the strategy's choice)
    "local_epochs": 1,
    "batch_size": 32,
    "finetune_epochs": 1,
    "finetune_lr": 0.001,
    "staleness_alpha": 0.5,  # weight = (1 + staleness) ** -alpha
}


@dataclass(frozen=True)
class TaskSpec:
    """Everything a device needs to join a run: what to build, from which seed, how to train."""

    strategy: str
    arch: str
    num_classes: int
    seed: int = 0
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    mask_config: dict[str, Any] = field(default_factory=dict)
    hyper: dict[str, Any] = field(default_factory=dict)

    def h(self, key: str) -> Any:
        """A hyperparameter, falling back to the strategy-independent default."""
        return self.hyper.get(key, DEFAULT_HYPER.get(key))

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "seed": self.seed,
            "arch_kwargs": dict(self.arch_kwargs),
            "mask_config": dict(self.mask_config),
            "hyper": dict(self.hyper),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        return cls(
            strategy=str(d["strategy"]),
            arch=str(d["arch"]),
            num_classes=int(d["num_classes"]),
            seed=int(d.get("seed", 0)),
            arch_kwargs=dict(d.get("arch_kwargs") or {}),
            mask_config=dict(d.get("mask_config") or {}),
            hyper=dict(d.get("hyper") or {}),
        )


@dataclass
class FitResult:
    """What a client half returns from a round of local training."""

    body: Body
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """An update as the server half sees it: decoded, attributed, and weighted for staleness."""

    device_id: str
    body: DecodedBody
    num_samples: int
    staleness: int = 0
    weight: float = 1.0  # staleness factor in (0, 1]; the server half multiplies it into its own weighting


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    num_samples: int


@dataclass
class FinalModel:
    """A device's personalized model after finalization."""

    model: Any  # the torch module in its final parameterization
    evaluation: Evaluation
    mask: np.ndarray | None = None  # final binary mask, for mask-based strategies
    metrics: dict[str, float] = field(default_factory=dict)


class ServerHalf(abc.ABC):
    """Turns a set of update bodies into the next global body."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def initial_body(self) -> Body | None:
        """The global body announced with round 1 (None: devices start from the task alone)."""

    @abc.abstractmethod
    def aggregate(self, updates: list[ClientUpdate], round_no: int) -> Body:
        """The global body announced with round ``round_no + 1``."""

    def expected_update(self) -> dict[str, tuple[int, ...]] | None:
        """Names and shapes an update body must have; the transport rejects anything else."""
        return None


class ClientHalf(abc.ABC):
    """Trains on one device's data; keeps whatever local state the strategy needs between rounds."""

    def __init__(self, spec: TaskSpec, data: Any) -> None:
        self.spec = spec
        self.data = data

    @abc.abstractmethod
    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        """Local training for one round from the latest global body."""

    @abc.abstractmethod
    def evaluate(self, global_body: DecodedBody | None) -> Evaluation:
        """Personalized test accuracy now, as the device would end if the run stopped here."""

    @abc.abstractmethod
    def finalize(self, global_body: DecodedBody | None) -> FinalModel:
        """End of the run: build, fine-tune and evaluate the device's personalized model."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Local state that must survive a restart of the device (arrays only: saved without pickle)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned."""


class Strategy(abc.ABC):
    """A named pair of halves."""

    name: str = ""
    description: str = ""
    defaults: ClassVar[dict[str, Any]] = {}  # the strategy's own hyperparameter defaults over DEFAULT_HYPER
    federated: ClassVar[bool] = True  # False: no rounds at all, devices only finalize (an ablation)
    samples_devices: ClassVar[bool] = True  # False: every device trains every round (needs no network)

    def effective_hyper(self, spec: TaskSpec) -> dict[str, Any]:
        """Every hyperparameter this strategy will use for ``spec`` (what a task message carries)."""
        return {**DEFAULT_HYPER, **self.defaults, **spec.hyper}

    @abc.abstractmethod
    def server(self, spec: TaskSpec) -> ServerHalf: ...

    @abc.abstractmethod
    def client(self, spec: TaskSpec, data: Any) -> ClientHalf: ...
