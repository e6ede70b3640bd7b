"""Local-only training: every device trains its own dense model and sends nothing of it.

The reference point for personalization: what a device reaches with no federation at all, on the same
budget of rounds x local epochs. Updates carry an empty body (the envelope still counts as traffic).
"""

from __future__ import annotations

from fedmask.strategies.base import (
    Body,
    ClientHalf,
    ClientUpdate,
    DecodedBody,
    FitResult,
    ServerHalf,
    Strategy,
    TaskSpec,
)
from fedmask.strategies.fedavg import DEFAULTS, hyper, sgd
from fedmask.strategies.model_client import ModelClient
from fedmask.strategies.training import derive_seed


class LocalServer(ServerHalf):
    def initial_body(self) -> Body | None:
        return None

    def expected_update(self) -> dict[str, tuple[int, ...]]:
        return {}

    def aggregate(self, updates: list[ClientUpdate], round_no: int) -> Body:
        return {}


class LocalClient(ModelClient):
    def receive(self, global_body: DecodedBody | None) -> None:
        """Nothing arrives: the device's model is its own."""

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        metrics = self.train(
            sgd(self.model, self.spec, hyper(self.spec, "lr")),
            epochs=int(self.spec.h("local_epochs")),
            seed=derive_seed(self.device_seed, round_no),
        )
        return FitResult(body={}, num_samples=len(self.data.y_train), metrics=metrics)


class LocalOnly(Strategy):
    name = "local"
    description = "no federation: each device trains its own dense model"
    samples_devices = False  # it needs no network, so no device waits for its turn
    defaults = DEFAULTS  # the same optimizer as FedAvg, so a task message carries what in-process uses

    def server(self, spec: TaskSpec) -> ServerHalf:
        return LocalServer(spec)

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return LocalClient(spec, data)
