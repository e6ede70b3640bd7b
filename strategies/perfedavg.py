"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020): FedAvg on the MAML objective.

Each device minimizes ``F_i(w) = f_i(w - alpha * grad f_i(w))``: a model that is good *after one local
gradient step*. A local step takes independent minibatches D, D' (and D'' for Hessian-free):

    w_tmp = w - alpha * grad f(w; D)
    first-order (FO):   w <- w - beta * grad f(w_tmp; D')
    Hessian-free (HF):  w <- w - beta * (I - alpha * H(w; D'')) grad f(w_tmp; D')

where HF approximates the Hessian-vector product by a central difference of gradients (the paper's
Per-FedAvg (HF)), ``H v ~ (grad f(w + r) - grad f(w - r)) / (2 |r| / |v|)`` with ``r = delta v / |v|``.
Consecutive minibatches of a shuffled epoch form the groups, so an epoch still visits each sample once.

Weights travel as float32 both ways and the server averages them like FedAvg. Before testing (every
evaluation and the final one) a device adapts the global model with ``adapt_steps`` plain gradient
steps of size ``alpha`` on its own training data; that step is the personalization.

Hyperparameters: ``lr`` (beta, the outer step), ``alpha`` (the inner and adaptation step), ``delta``
(HF difference step), ``adapt_steps``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from fedmask.strategies.base import (
    ClientHalf,
    DecodedBody,
    Evaluation,
    FinalModel,
    FitResult,
    ServerHalf,
    Strategy,
    TaskSpec,
)
from fedmask.strategies.fedavg import FedAvgServer, weights_body
from fedmask.strategies.model_client import ModelClient
from fedmask.strategies.training import as_tensors, derive_seed, evaluate

DEFAULTS = {"lr": 0.05, "alpha": 0.01, "delta": 1e-2, "adapt_steps": 1}
VARIANTS = ("fo", "hf")

Batch = tuple[torch.Tensor, torch.Tensor]


def _hyper(spec: TaskSpec, key: str):
    return spec.hyper.get(key, DEFAULTS.get(key, spec.h(key)))


def gradients(model: nn.Module, params: list[torch.Tensor], batch: Batch) -> list[torch.Tensor]:
    """Gradient of the mean cross-entropy on ``batch`` with respect to ``params`` (model in train mode)."""
    x, y = batch
    loss = nn.functional.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, params))


@torch.no_grad()
def _add_(params: list[torch.Tensor], vectors: list[torch.Tensor], scale: float) -> None:
    for p, v in zip(params, vectors):
        p.add_(v, alpha=scale)


def hessian_vector(
    model: nn.Module, params: list[torch.Tensor], batch: Batch, vector: list[torch.Tensor], delta: float
) -> list[torch.Tensor]:
    """``H(w; batch) @ vector`` by a central difference of gradients, no second derivatives needed.

    The probe points are ``w +- r`` with ``r = delta * vector / |vector|``: a step of fixed length
    ``delta`` whatever the size of ``vector``, large enough to rise above float32 rounding in the
    gradients and small enough for the difference to stay local. ``params`` end where they started.
    """
    norm = float(torch.sqrt(sum((v * v).sum() for v in vector)))
    if norm == 0.0:
        return [torch.zeros_like(v) for v in vector]
    start = [p.detach().clone() for p in params]
    step = delta / norm
    _add_(params, vector, step)
    plus = gradients(model, params, batch)
    _add_(params, vector, -2.0 * step)
    minus = gradients(model, params, batch)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    return [(gp - gm) / (2.0 * step) for gp, gm in zip(plus, minus)]


def meta_step(
    model: nn.Module,
    params: list[torch.Tensor],
    batches: tuple[Batch, ...],
    *,
    alpha: float,
    beta: float,
    variant: str,
    delta: float,
) -> float:
    """One Per-FedAvg step in place; ``batches`` is (D, D') for FO and (D, D', D'') for HF.

    Returns the loss at ``w_tmp`` on D' (the MAML objective the step descends).
    """
    start = [p.detach().clone() for p in params]
    _add_(params, gradients(model, params, batches[0]), -alpha)  # w_tmp
    x, y = batches[1]
    loss = nn.functional.cross_entropy(model(x), y)
    outer = list(torch.autograd.grad(loss, params))
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    if variant == "hf":
        curvature = hessian_vector(model, params, batches[2], outer, delta)
        outer = [o - alpha * hv for o, hv in zip(outer, curvature)]
    _add_(params, outer, -beta)
    return float(loss.detach())


def batch_groups(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, group: int, generator: torch.Generator
) -> Iterator[tuple[Batch, ...]]:
    """One shuffled epoch as groups of ``group`` consecutive minibatches (wrapping around at the end)."""
    n = len(y)
    order = torch.randperm(n, generator=generator)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    for start in range(0, len(batches), group):
        yield tuple((x[idx], y[idx]) for idx in (batches[(start + j) % len(batches)] for j in range(group)))


class PerFedAvgClient(ModelClient):
    def __init__(self, spec: TaskSpec, data, *, variant: str) -> None:
        super().__init__(spec, data)
        if variant not in VARIANTS:
            raise ValueError(f"perfedavg: variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        self.receive(global_body)
        x, y = as_tensors(self.data.x_train, self.data.y_train)
        if len(y) == 0:
            return FitResult(
                body=weights_body(self.model.get_weights()), num_samples=0, metrics={"loss": 0.0}
            )
        params = self.model.trainable_parameters()
        generator = torch.Generator().manual_seed(derive_seed(self.device_seed, round_no))
        group = 2 if self.variant == "fo" else 3
        losses = []
        self.model.train()
        for _ in range(int(self.spec.h("local_epochs"))):
            for batches in batch_groups(x, y, int(self.spec.h("batch_size")), group, generator):
                losses.append(
                    meta_step(
                        self.model,
                        params,
                        batches,
                        alpha=float(_hyper(self.spec, "alpha")),
                        beta=float(_hyper(self.spec, "lr")),
                        variant=self.variant,
                        delta=float(_hyper(self.spec, "delta")),
                    )
                )
        return FitResult(
            body=weights_body(self.model.get_weights()),
            num_samples=len(y),
            metrics={"loss": float(np.mean(losses))},
        )

    def adapt(self) -> None:
        """The one-step local adaptation before testing: plain gradient steps of size ``alpha``."""
        x, y = as_tensors(self.data.x_train, self.data.y_train)
        if len(y) == 0:
            return
        params = self.model.trainable_parameters()
        generator = torch.Generator().manual_seed(derive_seed(self.device_seed, "adapt"))
        batch_size = int(self.spec.h("batch_size"))
        self.model.train()
        for _ in range(int(_hyper(self.spec, "adapt_steps"))):
            idx = torch.randperm(len(y), generator=generator)[:batch_size]
            _add_(params, gradients(self.model, params, (x[idx], y[idx])), -float(_hyper(self.spec, "alpha")))

    def _adapted_evaluation(self, global_body: DecodedBody | None) -> Evaluation:
        self.receive(global_body)
        self.adapt()
        return evaluate(self.model, self.data.x_test, self.data.y_test)

    def evaluate(self, global_body: DecodedBody | None) -> Evaluation:
        self.receive(global_body)
        meta_weights = self.model.get_weights()
        result = self._adapted_evaluation(None)
        self.model.set_weights(meta_weights)  # the adapted model is for testing only
        return result

    def finalize(self, global_body: DecodedBody | None) -> FinalModel:
        return FinalModel(model=self.model, evaluation=self._adapted_evaluation(global_body))


class PerFedAvg(Strategy):
    name = "perfedavg"
    description = "Per-FedAvg, first-order: FedAvg on the MAML objective, one local step before testing"
    defaults = DEFAULTS
    variant = "fo"

    def server(self, spec: TaskSpec) -> ServerHalf:
        return FedAvgServer(spec)  # Per-FedAvg aggregates exactly like FedAvg

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return PerFedAvgClient(spec, data, variant=self.variant)


class PerFedAvgHF(PerFedAvg):
    name = "perfedavg_hf"
    description = "Per-FedAvg, Hessian-free: finite-difference Hessian-vector product in the meta step"
    variant = "hf"
