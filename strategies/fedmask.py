"""FedMask: devices learn binary masks over frozen random weights; only masks cross the network.

Client half: train real-valued scores for E local epochs with the sparsity loss, upload the binary mask
(1 bit per masked parameter before entropy coding). Server half: per-parameter keep shares over the
participating masks, turned into a downlink body by the configured rule (``strategies.mask_rules``).
Finalization: fix the mask, fine-tune the kept weights on local data, evaluate.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmask.models import WeightMode, sparsity_loss
from fedmask.models.sparsity import decoupled_sparsity_step
from fedmask.protocol.tensor_codec import Coded
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
from fedmask.strategies.mask_rules import MaskRule, make_rule
from fedmask.strategies.model_client import ModelClient
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import derive_seed

DEFAULTS = {
    "lr": 0.1,  # Adam on scores; scores live on a much larger scale than weights
    "sparsity_lambda": 0.02,  # lambda of the first masked layer
    "sparsity_growth": 2.0,  # lambda_l = sparsity_lambda * growth ** depth
    # "decoupled": the penalty's pull is applied after each Adam step at a fixed rate (see
    # models.sparsity.decoupled_sparsity_step); "loss": added to the loss as in the paper's formulation.
    "sparsity_mode": "decoupled",
    "mask_rule": "overlap",
    "finetune_epochs": 5,
    "finetune_lr": 1e-3,
}


def _hyper(spec: TaskSpec, key: str):
    return spec.hyper.get(key, DEFAULTS.get(key, spec.h(key)))


def rule_for(spec: TaskSpec) -> MaskRule:
    params = dict(_hyper(spec, "mask_rule_params") or {})
    return make_rule(_hyper(spec, "mask_rule"), **params)


class FedMaskServer(ServerHalf):
    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.rule = rule_for(spec)
        self.num_bits = build_for(spec, WeightMode.MASK).num_mask_bits

    def initial_body(self) -> Body | None:
        return None  # every device derives the same frozen weights and initial scores from the task

    def expected_update(self) -> dict[str, tuple[int, ...]]:
        return {"mask": (self.num_bits,)}

    def aggregate(self, updates: list[ClientUpdate], round_no: int) -> Body:
        counts = np.zeros(self.num_bits, dtype=np.float64)
        total = 0.0
        for update in updates:
            counts += update.weight * update.body["mask"].astype(np.float64)
            total += update.weight
        share = counts / total if total > 0 else counts
        return self.rule.server_body(share)


class FedMaskClient(ModelClient):
    mode = WeightMode.MASK

    def __init__(self, spec: TaskSpec, data) -> None:
        super().__init__(spec, data)
        self.rule = rule_for(spec)

    def receive(self, global_body: DecodedBody | None) -> None:
        """Merge the aggregate into this device's own scores, by the task's rule."""
        if global_body:
            self.model.set_scores(self.rule.merge(self.model.get_scores(), global_body))

    def _sparsity(self, model) -> torch.Tensor:
        return sparsity_loss(
            model, _hyper(self.spec, "sparsity_lambda"), _hyper(self.spec, "sparsity_growth")
        )

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        self.receive(global_body)
        lr = _hyper(self.spec, "lr")
        optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=lr)
        torch.manual_seed(derive_seed(self.device_seed, round_no, "sampling"))
        decoupled = _hyper(self.spec, "sparsity_mode") == "decoupled"
        lam, growth = _hyper(self.spec, "sparsity_lambda"), _hyper(self.spec, "sparsity_growth")
        metrics = self.train(
            optimizer,
            epochs=int(self.spec.h("local_epochs")),
            seed=derive_seed(self.device_seed, round_no),
            extra_loss=None if decoupled else self._sparsity,
            after_step=(lambda: decoupled_sparsity_step(self.model, lam, growth, lr)) if decoupled else None,
        )
        mask = self.model.get_mask()
        metrics["density"] = float(mask.mean()) if mask.size else 1.0
        return FitResult(
            body={"mask": Coded(mask, "bits")}, num_samples=len(self.data.y_train), metrics=metrics
        )

    def evaluate(self, global_body: DecodedBody | None) -> Evaluation:
        return self.test()  # the device's own mask as it stands; merging happens when it trains

    def finalize(self, global_body: DecodedBody | None) -> FinalModel:
        # The last aggregate is the fleet's latest consensus; a device that trained rarely gains most.
        self.receive(global_body)
        mask = self.model.get_mask()
        self.model.start_finetune()
        epochs = int(_hyper(self.spec, "finetune_epochs"))
        if epochs > 0:
            optimizer = torch.optim.Adam(
                self.model.trainable_parameters(), lr=_hyper(self.spec, "finetune_lr")
            )
            self.train(optimizer, epochs=epochs, seed=derive_seed(self.device_seed, "finetune"))
        return FinalModel(
            model=self.model, evaluation=self.test(), mask=mask, metrics={"density": float(mask.mean())}
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"scores": self.model.get_scores()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.model.set_scores(state["scores"])


class FedMask(Strategy):
    defaults = DEFAULTS
    name = "fedmask"
    description = "binary masks over frozen random weights, aggregated on the overlap, then fine-tuned"

    def server(self, spec: TaskSpec) -> ServerHalf:
        return FedMaskServer(spec)

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return FedMaskClient(spec, data)
