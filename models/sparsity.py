"""Sparsity regularizer: ``sum_l lambda_l * mean(sigmoid(s_l))`` with ``lambda_l`` growing with depth.

The mean keep-probability of a layer is differentiable in its scores (no straight-through needed),
and pushing it down prunes. ``lambda_l = base_lambda * growth ** depth`` where ``depth`` is the
layer's index in ``model.layers()`` (every mask-capable layer counts, masked or not, so a layer's
lambda does not change with the masked-layer selection): the first feature layers stay dense and
the classifier layers become sparse.
"""

from __future__ import annotations

import math

import torch

from fedmask.models.network import MaskedNetwork


def layer_lambdas(model: MaskedNetwork, base_lambda: float, growth: float = 2.0) -> dict[str, float]:
    """``{layer name: base_lambda * growth ** depth}`` for every masked layer of ``model``."""
    if not (math.isfinite(base_lambda) and base_lambda >= 0):
        raise ValueError(f"sparsity: base_lambda must be finite and >= 0, got {base_lambda}")
    if not (math.isfinite(growth) and growth > 0):
        raise ValueError(f"sparsity: growth must be finite and > 0, got {growth}")
    return {
        name: base_lambda * growth**depth
        for depth, (name, layer) in enumerate(model.layers())
        if layer.masked
    }


def sparsity_loss(model: MaskedNetwork, base_lambda: float, growth: float = 2.0) -> torch.Tensor:
    """The regularizer as a scalar tensor (zero when no layer is masked); add it to the task loss."""
    lambdas = layer_lambdas(model, base_lambda, growth)
    total: torch.Tensor | None = None
    for name, layer in model.layers():
        if name not in lambdas:
            continue
        scores = torch.cat([s.reshape(-1) for s in layer.scores.values()])
        term = lambdas[name] * torch.sigmoid(scores).mean()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


@torch.no_grad()
def decoupled_sparsity_step(model: MaskedNetwork, base_lambda: float, growth: float, lr: float) -> None:
    """Apply the regularizer's pull on the scores outside the optimizer: ``s -= lr * lambda_l * sigmoid'(s)``.

    Why: Adam divides each coordinate's gradient by its own running magnitude, so once the task loss is
    satisfied a score whose task gradient is ~0 is driven by the (tiny, but consistent) sparsity
    gradient at the full learning rate, and whole layers collapse to zero within an epoch (seen on a
    one-class Fashion-MNIST device: every output exactly 0). Applied here, like AdamW's decoupled
    weight decay, the pull has a fixed, depth-graded rate that task gradients can always outweigh.
    """
    for name, lam in layer_lambdas(model, base_lambda, growth).items():
        layer = dict(model.layers())[name]
        for scores in layer.scores.values():
            sig = torch.sigmoid(scores)
            scores.sub_(lr * lam * sig * (1 - sig))
