"""BNN-FedAvg: federated averaging of binarized networks (BinaryConnect weights, as in FedMask's baseline).

Devices train in ``WeightMode.BINARY``: latent real weights clipped to [-1, 1], forward ``sign(W)``
times the layer's fixed scale, straight-through backward. Each update carries only the signs of the
latent weights, one bit per weight before coding (``bits``).

The server turns the signs into latent weights: the weighted mean of the ±1 signs, a value in
[-1, 1] whose sign is the (weighted) majority and whose magnitude says how strongly devices agree, so
a weight the fleet disputes starts the next round close to 0 and flips easily.

Downlink coding: ``f16``. The mean of signs needs neither the range nor the precision of float32: in
[-1, 1] half precision is within 2**-11 of the float32 value (finer than a single SGD step moves a
latent weight), it never flips a sign (only a magnitude below 6e-8 could round to zero, and zero
binarizes to +1 exactly like a tiny positive value), and it halves FedAvg's downlink. Sending bits
back instead would throw away the agreement magnitude, the only thing that distinguishes this from a
majority vote.
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
    FitResult,
    ServerHalf,
    Strategy,
    TaskSpec,
)
from fedmask.strategies.model_client import ModelClient
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import derive_seed

DEFAULTS = {"lr": 0.01}  # Adam on latent weights in [-1, 1]; BinaryConnect trains with Adam too


def _hyper(spec: TaskSpec, key: str):
    return spec.hyper.get(key, DEFAULTS.get(key, spec.h(key)))


def signs_of(latent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The binarized weights as bools (True = +1), with ``sign(0) = +1`` like the forward pass."""
    return {name: np.asarray(w) >= 0 for name, w in latent.items()}


def mean_of_signs(signs: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Weighted mean of ±1 per weight: the latent weights the next round starts from, in [-1, 1]."""
    total = float(sum(weights))
    if not signs or total <= 0:
        raise ValueError("mean_of_signs: need at least one update with a positive weight")
    return {
        name: (
            sum(w * (2.0 * s[name].astype(np.float64) - 1.0) for s, w in zip(signs, weights)) / total
        ).astype(np.float32)
        for name in signs[0]
    }


class BnnServer(ServerHalf):
    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.shapes = {k: v.shape for k, v in build_for(spec, WeightMode.BINARY).get_weights().items()}

    def initial_body(self) -> Body | None:
        return None  # devices derive identical initial latent weights from the task seed

    def expected_update(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def aggregate(self, updates: list[ClientUpdate], round_no: int) -> Body:
        latent = mean_of_signs(
            [{name: u.body[name].astype(bool) for name in self.shapes} for u in updates],
            [u.weight * u.num_samples for u in updates],
        )
        return {name: Coded(value, "f16") for name, value in latent.items()}


class BnnClient(ModelClient):
    """Holds the latent weights of the binarized network (restarted from the global mean each round)."""

    mode = WeightMode.BINARY

    # receive(): set_weights in BINARY mode clips the global mean to [-1, 1].

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        self.receive(global_body)
        optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=float(_hyper(self.spec, "lr")))
        metrics = self.train(
            optimizer,
            epochs=int(self.spec.h("local_epochs")),
            seed=derive_seed(self.device_seed, round_no),
        )
        signs = signs_of(self.model.get_weights())
        return FitResult(
            body={name: Coded(s, "bits") for name, s in signs.items()},
            num_samples=len(self.data.y_train),
            metrics=metrics,
        )


class BnnFedAvg(Strategy):
    name = "bnn"
    description = "binarized weights (sign, straight-through); devices upload 1 bit per weight"
    defaults = DEFAULTS

    def server(self, spec: TaskSpec) -> ServerHalf:
        return BnnServer(spec)

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return BnnClient(spec, data)
