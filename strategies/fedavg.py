"""FedAvg (McMahan et al. 2017) and FedAvg followed by local fine-tuning.

Devices train the dense network (float32 weights, initialised from the task seed so round 1 needs no
download), upload their weights; the server averages them weighted by samples and staleness.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmask.models import WeightMode
from fedmask.protocol.tensor_codec import Coded
from fedmask.strategies.base import (
    Body,
    ClientHalf,
    ClientUpdate,
    DecodedBody,
    FinalModel,
    FitResult,
    ServerHalf,
    Strategy,
    TaskSpec,
)
from fedmask.strategies.model_client import FINETUNE_DEFAULTS, FINETUNE_KEYS, ModelClient
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import derive_seed

DEFAULTS = {"lr": 0.05, "momentum": 0.9, "finetune_lr": 0.01, **FINETUNE_DEFAULTS}


def hyper(spec: TaskSpec, key: str):
    return spec.hyper.get(key, DEFAULTS.get(key, spec.h(key)))


def weights_body(weights: dict[str, np.ndarray]) -> Body:
    return {name: Coded(w, "f32") for name, w in weights.items()}


def sgd(model: torch.nn.Module, spec: TaskSpec, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=hyper(spec, "momentum"))


class FedAvgServer(ServerHalf):
    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.shapes = {k: v.shape for k, v in build_for(spec, WeightMode.DENSE).get_weights().items()}

    def initial_body(self) -> Body | None:
        return None  # devices derive identical initial weights from the task seed

    def expected_update(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def aggregate(self, updates: list[ClientUpdate], round_no: int) -> Body:
        weights = np.array([u.weight * u.num_samples for u in updates], dtype=np.float64)
        weights /= weights.sum()
        averaged = {
            name: sum(w * u.body[name].astype(np.float64) for w, u in zip(weights, updates)).astype(
                np.float32
            )
            for name in self.shapes
        }
        return weights_body(averaged)


class FedAvgClient(ModelClient):
    """Holds the latest global model; ``fine_tune`` decides whether finalization adapts it locally."""

    def __init__(self, spec: TaskSpec, data, *, fine_tune: bool) -> None:
        super().__init__(spec, data)
        self.finetunes = fine_tune

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        self.receive(global_body)
        metrics = self.train(
            sgd(self.model, self.spec, hyper(self.spec, "lr")),
            epochs=int(self.spec.h("local_epochs")),
            seed=derive_seed(self.device_seed, round_no),
        )
        return FitResult(
            body=weights_body(self.model.get_weights()), num_samples=len(self.data.y_train), metrics=metrics
        )

    def finalize(self, global_body: DecodedBody | None) -> FinalModel:
        self.receive(global_body)
        if self.finetunes:
            self.fine_tune(
                sgd(self.model, self.spec, hyper(self.spec, "finetune_lr")),
                {k: hyper(self.spec, k) for k in FINETUNE_KEYS},
            )
        return FinalModel(model=self.model, evaluation=self.test())


class FedAvg(Strategy):
    defaults = DEFAULTS
    name = "fedavg"
    description = "one global dense model, sample-weighted average of device weights"

    def server(self, spec: TaskSpec) -> ServerHalf:
        return FedAvgServer(spec)

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return FedAvgClient(spec, data, fine_tune=False)


class FedAvgFineTune(FedAvg):
    name = "fedavg_ft"
    description = "FedAvg, then each device fine-tunes the global model on its own data"

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return FedAvgClient(spec, data, fine_tune=True)
