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
from fedmask.models.structure import enforce_structure
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
from fedmask.strategies.model_client import FINETUNE_DEFAULTS, FINETUNE_KEYS, ModelClient
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import derive_seed

DEFAULTS = {
    "lr": 0.1,  # Adam on scores; scores live on a much larger scale than weights
    "sparsity_lambda": 0.02,  # lambda of the first masked layer
    "sparsity_growth": 2.0,  # lambda_l = sparsity_lambda * growth ** depth
    # "loss": added to the loss as in the paper's formulation (through Adam, so it bites: it alone can
    # empty a class row, which the unit floor below prevents); "decoupled": a fixed-rate pull after
    # each Adam step (models.sparsity.decoupled_sparsity_step), much weaker (density ~0.8).
    "sparsity_mode": "loss",
    "mask_rule": "overlap",
    "finetune_lr": 1e-3,
    **FINETUNE_DEFAULTS,  # the fine-tuning recipe FedAvg + FT shares (strategies.model_client)
    # Structure (models.structure): each hidden Conv/Linear layer keeps this share of its units (the
    # rest are pruned whole, so compaction removes them), reached linearly over the first
    # `prune_ramp_rounds` rounds; every kept unit keeps at least `unit_floor` of its inputs.
    "unit_keep": 0.5,
    # fnmatch patterns of the hidden layers that are pruned; None: every hidden layer but the first,
    # which is small and reads the raw input (pruning it cost accuracy and saved little).
    "prune_layers": None,
    "prune_ramp_rounds": 3,
    "unit_floor": 0.05,
    "class_floor": None,  # the floor of the classifier's class rows (None: unit_floor)
    # Per-device budgets: {device class: unit_keep}; a device's class comes from its data's
    # meta["device_class"] (the agent's --device-class); unlisted classes use unit_keep.
    "unit_keep_by_class": {},
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
        # Keep-counts per distinct staleness weight (integer adds of the bits, no float copy of each
        # mask), then one weighted sum: linear in devices with a small constant.
        by_weight: dict[float, np.ndarray] = {}
        for update in updates:
            if update.weight not in by_weight:
                by_weight[update.weight] = np.zeros(self.num_bits, dtype=np.int32)
            by_weight[update.weight] += update.body["mask"]
        counts = np.zeros(self.num_bits, dtype=np.float64)
        for weight, kept in by_weight.items():
            counts += weight * kept
        total = sum(update.weight for update in updates)
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

    @property
    def prune_layers(self) -> tuple[str, ...]:
        patterns = _hyper(self.spec, "prune_layers")
        if patterns is None:
            patterns = [name for name, layer in self.model.layers() if layer.masked][1:]
        return tuple(patterns)

    def unit_keep(self, round_no: int | None) -> float:
        """This device's share of units kept in ``round_no`` (None: the final budget)."""
        budgets = _hyper(self.spec, "unit_keep_by_class") or {}
        device_class = (getattr(self.data, "meta", None) or {}).get("device_class")
        target = float(budgets.get(device_class, _hyper(self.spec, "unit_keep")))
        ramp = int(_hyper(self.spec, "prune_ramp_rounds"))
        if round_no is None or ramp <= 0:
            return target
        return 1.0 - (1.0 - target) * min(1.0, round_no / ramp)

    def shape(self, round_no: int | None) -> None:
        """Line the mask up into whole units at this round's budget (see models.structure)."""
        enforce_structure(
            self.model,
            self.unit_keep(round_no),
            float(_hyper(self.spec, "unit_floor")),
            self.prune_layers,
            _hyper(self.spec, "class_floor"),
        )

    def _sparsity(self, model) -> torch.Tensor:
        return sparsity_loss(
            model, _hyper(self.spec, "sparsity_lambda"), _hyper(self.spec, "sparsity_growth")
        )

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        self.receive(global_body)
        self.shape(round_no)  # train on the structure this round allows
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
        self.shape(round_no)
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
        self.shape(None)
        mask = self.model.get_mask()
        self.model.start_finetune()
        optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=_hyper(self.spec, "finetune_lr"))
        self.fine_tune(optimizer, {k: _hyper(self.spec, k) for k in FINETUNE_KEYS})
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


class FineTuneOnly(FedMask):
    """The ablation FedMask must beat: no mask rounds at all, then FedMask's own finalization.

    Every device prunes the untrained network to its unit budget (ties broken by unit index, the
    same on every device) and fine-tunes what is left, exactly as FedMask finalizes; nothing crosses
    the network. What FedMask gains over this is what its federated mask rounds contribute.
    """

    name = "ft_only"
    description = "ablation: FedMask's finalization (prune to budget, fine-tune) with no mask rounds"
    federated = False
