"""Local training and evaluation loops shared by every strategy."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedmask.strategies.base import Evaluation

ExtraLoss = Callable[[nn.Module], torch.Tensor]


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (device id, round, purpose): same on every platform."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)).long()


def train_epochs(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    seed: int,
    extra_loss: ExtraLoss | None = None,
    after_step: Callable[[], None] | None = None,
    class_weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Minibatch training; the shuffling order depends only on ``seed`` (reproducible across runs).

    ``class_weights`` (one per class) weight the cross-entropy, e.g. ``balanced_class_weights``.
    """
    xt, yt = as_tensors(x, y)
    n = len(yt)
    if n == 0:
        return {"loss": 0.0, "train_accuracy": 0.0}
    gen = torch.Generator().manual_seed(seed)
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = xt[idx], yt[idx]
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total_loss += float(loss.detach()) * len(yb)
            correct += int((logits.detach().argmax(1) == yb).sum())
            seen += len(yb)
    return {"loss": total_loss / seen, "train_accuracy": correct / seen}


def balanced_class_weights(y: np.ndarray, num_classes: int, power: float = 1.0) -> np.ndarray:
    """``(n / (k * n_c)) ** power`` for the ``k`` classes present (absent classes weigh 1): with power 1
    every present class weighs the same in total, so a class with a handful of samples is not ignored."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes)
    if present.any():
        weights[present] = (counts.sum() / (present.sum() * counts[present])) ** power
    return weights


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> Evaluation:
    """Accuracy and mean cross-entropy on (x, y) in eval mode."""
    xt, yt = as_tensors(x, y)
    n = len(yt)
    if n == 0:
        return Evaluation(accuracy=0.0, loss=0.0, num_samples=0)
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        logits = model(xt[start : start + batch_size])
        yb = yt[start : start + batch_size]
        total_loss += float(loss_fn(logits, yb))
        correct += int((logits.argmax(1) == yb).sum())
    return Evaluation(accuracy=correct / n, loss=total_loss / n, num_samples=n)


def staleness_weight(staleness: int, alpha: float) -> float:
    """Polynomial staleness discount (Xie et al., FedAsync): fresh updates weigh 1."""
    return float((1.0 + max(0, staleness)) ** -alpha)
