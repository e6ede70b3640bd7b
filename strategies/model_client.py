"""The client half most strategies share: one network on the device, its weights the device's state."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmask.models import WeightMode
from fedmask.strategies.base import ClientHalf, DecodedBody, Evaluation, FinalModel, TaskSpec
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import derive_seed, evaluate, train_epochs


class ModelClient(ClientHalf):
    """Holds ``self.model`` in ``mode``; subclasses say how a global body is received and how to fit.

    Evaluation and finalization apply the latest global body, then test the model as it stands; a
    strategy that adapts before testing (Per-FedAvg) or fine-tunes (FedAvg + FT) overrides them.
    """

    mode: WeightMode = WeightMode.DENSE

    def __init__(self, spec: TaskSpec, data: Any) -> None:
        super().__init__(spec, data)
        self.model = build_for(spec, self.mode)
        self.device_seed = derive_seed(spec.seed, data.device_id)

    def receive(self, global_body: DecodedBody | None) -> None:
        """Apply a global body to the local model (default: the body holds every trainable tensor)."""
        if global_body:
            self.model.set_weights(global_body)

    def train(
        self, optimizer: torch.optim.Optimizer, *, epochs: int, seed: int, **kwargs: Any
    ) -> dict[str, float]:
        """Local training on this device's training data with the task's batch size."""
        return train_epochs(
            self.model,
            self.data.x_train,
            self.data.y_train,
            epochs=epochs,
            batch_size=int(self.spec.h("batch_size")),
            optimizer=optimizer,
            seed=seed,
            **kwargs,
        )

    def test(self) -> Evaluation:
        return evaluate(self.model, self.data.x_test, self.data.y_test)

    def evaluate(self, global_body: DecodedBody | None) -> Evaluation:
        self.receive(global_body)
        return self.test()

    def finalize(self, global_body: DecodedBody | None) -> FinalModel:
        self.receive(global_body)
        return FinalModel(model=self.model, evaluation=self.test())

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.model.get_weights()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.model.set_weights(state)
