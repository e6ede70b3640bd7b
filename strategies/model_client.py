"""The client half most strategies share: one network on the device, its weights the device's state."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedmask.models import WeightMode
from fedmask.strategies.base import ClientHalf, DecodedBody, Evaluation, FinalModel, TaskSpec
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import balanced_class_weights, derive_seed, evaluate, train_epochs

# The final fine-tuning recipe, shared by FedMask's finalization and FedAvg + FT so that neither
# gets a better fine-tune than the other:
FINETUNE_DEFAULTS: dict[str, Any] = {
    "finetune_epochs": 5,
    # ...but at least this many optimizer steps: a device with little data still gets a real fine-tune
    # (measured on the HMP tuning split: its 5- to 30-sample devices otherwise kept dead classes).
    "finetune_min_steps": 150,
    # Cross-entropy weighted per class by (n / (k n_c)) ** power: a class the device has only a few
    # samples of still gets predicted (0: plain cross-entropy).
    "finetune_balance": 0.5,
}
FINETUNE_KEYS = tuple(FINETUNE_DEFAULTS)


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

    def fine_tune(self, optimizer: torch.optim.Optimizer, recipe: dict[str, Any]) -> None:
        """Train the current parameterization on local data by the recipe of ``FINETUNE_DEFAULTS``."""
        epochs = int(recipe["finetune_epochs"])
        if epochs <= 0:
            return
        steps_per_epoch = max(1, math.ceil(len(self.data.y_train) / int(self.spec.h("batch_size"))))
        epochs = max(epochs, math.ceil(int(recipe["finetune_min_steps"]) / steps_per_epoch))
        power = float(recipe["finetune_balance"])
        weights = balanced_class_weights(self.data.y_train, self.spec.num_classes, power) if power else None
        self.train(
            optimizer, epochs=epochs, seed=derive_seed(self.device_seed, "finetune"), class_weights=weights
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
