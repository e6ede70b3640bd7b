"""Local-only training: every device trains its own dense model and sends nothing of it.

The reference point for personalization: what a device reaches with no federation at all, on the same
budget of rounds x local epochs. Updates carry an empty body (the envelope still counts as traffic).
"""

from __future__ import annotations

import numpy as np

from fedmask.models import WeightMode
from fedmask.strategies.base import (
    Body,
    ClientHalf,
    ClientUpdate,
    DecodedBody,
    Evaluation,
    FinalModel,
    FitResult,
    ServerHalf,
    Strategy,
    TaskSpec,
)
from fedmask.strategies.fedavg import DEFAULTS, hyper, sgd
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import derive_seed, evaluate, train_epochs


class LocalServer(ServerHalf):
    def initial_body(self) -> Body | None:
        return None

    def expected_update(self) -> dict[str, tuple[int, ...]]:
        return {}

    def aggregate(self, updates: list[ClientUpdate], round_no: int) -> Body:
        return {}


class LocalClient(ClientHalf):
    def __init__(self, spec: TaskSpec, data) -> None:
        super().__init__(spec, data)
        self.model = build_for(spec, WeightMode.DENSE)
        self.device_seed = derive_seed(spec.seed, data.device_id)

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        metrics = train_epochs(
            self.model,
            self.data.x_train,
            self.data.y_train,
            epochs=int(self.spec.h("local_epochs")),
            batch_size=int(self.spec.h("batch_size")),
            optimizer=sgd(self.model, self.spec, hyper(self.spec, "lr")),
            seed=derive_seed(self.device_seed, round_no),
        )
        return FitResult(body={}, num_samples=len(self.data.y_train), metrics=metrics)

    def evaluate(self, global_body: DecodedBody | None) -> Evaluation:
        return evaluate(self.model, self.data.x_test, self.data.y_test)

    def finalize(self, global_body: DecodedBody | None) -> FinalModel:
        return FinalModel(model=self.model, evaluation=self.evaluate(None))

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.model.get_weights()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.model.set_weights(state)


class LocalOnly(Strategy):
    name = "local"
    description = "no federation: each device trains its own dense model"
    defaults = DEFAULTS  # the same optimizer as FedAvg, so a task message carries what in-process uses

    def server(self, spec: TaskSpec) -> ServerHalf:
        return LocalServer(spec)

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return LocalClient(spec, data)
