"""Top-K sparsification with error feedback (Aji & Heafield 2017; Stich et al. 2018).

Devices train the dense network from the global weights like FedAvg, then upload only the k
largest-magnitude entries of *accumulated* = (this round's weight change + the residual left over from
earlier rounds). Whatever is not sent stays on the device as the new residual, so no part of an update
is lost, only delayed. Values travel as float32, positions as delta-coded varints (the ``topk`` coding).

The server adds the weighted mean of the sparse updates to its global weights and sends the full
weights back as float32 (the same downlink as FedAvg): with partial participation a device may have
sat out rounds, and it can apply full weights but not a delta against a model it never saw.

How many entries, in order of precedence (hyperparameters):
- ``k``: a fixed count;
- ``target_bits_per_param``: k is chosen per update, by encoding candidates with the real codec, so
  that the coded update costs about that many bits per parameter (how the comparison benchmark matches
  FedMask's measured uplink);
- ``topk_density``: a fixed fraction of the parameters (default 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgpack
import numpy as np

from fedmask.models import WeightMode
from fedmask.protocol.tensor_codec import Coded, encode_body
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
from fedmask.strategies.fedavg import DEFAULTS as FEDAVG_DEFAULTS
from fedmask.strategies.fedavg import sgd, weights_body
from fedmask.strategies.model_client import ModelClient
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import derive_seed

# The optimizer is FedAvg's (SGD with momentum); ``k`` and ``target_bits_per_param`` have no default.
DEFAULTS = {
    "lr": FEDAVG_DEFAULTS["lr"],
    "momentum": FEDAVG_DEFAULTS["momentum"],
    "topk_density": 0.01,
    "k_search_tolerance": 0.02,
    "k_search_steps": 8,
}

RESIDUAL_PREFIX = "residual/"


def _hyper(spec: TaskSpec, key: str):
    return spec.hyper.get(key, DEFAULTS.get(key, spec.h(key)))


def magnitude_order(flat: np.ndarray) -> np.ndarray:
    """Positions by decreasing magnitude; the stable sort breaks ties by position, the same everywhere."""
    return np.argsort(-np.abs(flat), kind="stable")


def first_k(order: np.ndarray, k: int) -> np.ndarray:
    """Boolean selector of the first ``k`` positions of ``order`` (clamped to [0, len(order)])."""
    chosen = np.zeros(order.size, dtype=bool)
    chosen[order[: max(0, min(int(k), order.size))]] = True
    return chosen


def top_k_selection(flat: np.ndarray, k: int) -> np.ndarray:
    """Boolean selector of the ``k`` largest-magnitude entries of a flat array (ties: lowest index)."""
    return first_k(magnitude_order(flat), k)


def split_update(
    accumulated: Mapping[str, np.ndarray], chosen: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(sent, residual) per tensor: chosen entries go out, the rest stay; ``sent + residual`` is exact.

    Each entry lands in exactly one of the two (the other holds 0.0), so the sum reproduces the
    accumulated update bit for bit.
    """
    sent, residual, offset = {}, {}, 0
    for name, value in accumulated.items():
        mask = chosen[offset : offset + value.size].reshape(value.shape)
        zero = np.zeros((), dtype=value.dtype)
        sent[name] = np.where(mask, value, zero)
        residual[name] = np.where(mask, zero, value)
        offset += value.size
    return sent, residual


def encoded_bits(arrays: Mapping[str, np.ndarray]) -> int:
    """Bits of ``arrays`` as a ``topk``-coded body in msgpack, exactly as the wire carries it."""
    body = {name: Coded(value, "topk") for name, value in arrays.items()}
    return 8 * len(msgpack.packb(encode_body(body), use_bin_type=True))


def k_for_target_bits(
    accumulated: Mapping[str, np.ndarray],
    target_bits_per_param: float,
    *,
    tolerance: float,
    max_steps: int,
    order: np.ndarray | None = None,
) -> int:
    """The k whose coded top-k update costs about ``target_bits_per_param`` bits per parameter.

    Starts from 48 bits per kept entry (32-bit value + a position varint of ~2 bytes) and corrects
    k in proportion to the measured size, which converges in a few steps because the cost per entry
    changes only slowly with k. Returns the best k measured (closest to the target). ``order`` is
    :func:`magnitude_order` of the flattened update, if the caller already has it.
    """
    n = sum(a.size for a in accumulated.values())
    if n == 0:
        return 0
    if order is None:
        order = magnitude_order(np.concatenate([a.reshape(-1) for a in accumulated.values()]))
    target = target_bits_per_param * n
    k = min(n, max(1, round(target / 48)))
    best_k, best_gap = k, math.inf
    tried: set[int] = set()
    for _ in range(max_steps):
        tried.add(k)
        bits = encoded_bits(split_update(accumulated, first_k(order, k))[0])
        gap = abs(bits - target)
        if gap < best_gap:
            best_k, best_gap = k, gap
        if gap <= tolerance * target:
            break
        k = min(n, max(1, round(k * target / max(bits, 1))))
        if k in tried:
            break
    return best_k


def k_rule(spec: TaskSpec) -> tuple[str, float]:
    """Which hyperparameter fixes k and its validated value: ``k``, ``target_bits_per_param`` or density."""
    k, target = spec.hyper.get("k"), spec.hyper.get("target_bits_per_param")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"topk: hyper 'k' must be a positive integer, got {k!r}")
        return "k", float(k)
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < math.inf:
            raise ValueError(f"topk: hyper 'target_bits_per_param' must be a number > 0, got {target!r}")
        return "target_bits_per_param", float(target)
    density = _hyper(spec, "topk_density")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"topk: hyper 'topk_density' must be a number in (0, 1], got {density!r}")
    return "topk_density", float(density)


class TopKServer(ServerHalf):
    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.weights = {
            name: w.astype(np.float32) for name, w in build_for(spec, WeightMode.DENSE).get_weights().items()
        }

    def initial_body(self) -> Body | None:
        return None  # devices derive identical initial weights from the task seed

    def expected_update(self) -> dict[str, tuple[int, ...]]:
        return {name: w.shape for name, w in self.weights.items()}

    def aggregate(self, updates: list[ClientUpdate], round_no: int) -> Body:
        if updates:
            factors = np.array([u.weight * u.num_samples for u in updates], dtype=np.float64)
            factors /= factors.sum()
            for name, w in self.weights.items():
                step = sum(f * u.body[name].astype(np.float64) for f, u in zip(factors, updates))
                self.weights[name] = (w.astype(np.float64) + step).astype(np.float32)
        return weights_body(self.weights)


class TopKClient(ModelClient):
    """Trains from the global weights; the error-feedback residual is the device's only state."""

    def __init__(self, spec: TaskSpec, data) -> None:
        super().__init__(spec, data)
        self.residual = {name: np.zeros_like(w) for name, w in self.model.get_weights().items()}
        self.k_rule = k_rule(spec)

    def choose_k(self, accumulated: Mapping[str, np.ndarray], order: np.ndarray) -> int:
        """How many entries this update sends (see the module docstring for the precedence)."""
        n = order.size
        rule, value = self.k_rule
        if rule == "k":
            return min(n, int(value))
        if rule == "target_bits_per_param":
            return k_for_target_bits(
                accumulated,
                value,
                tolerance=float(_hyper(self.spec, "k_search_tolerance")),
                max_steps=int(_hyper(self.spec, "k_search_steps")),
                order=order,
            )
        return min(n, max(1, round(value * n)))

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        self.receive(global_body)
        start = self.model.get_weights()
        metrics = self.train(
            sgd(self.model, self.spec, _hyper(self.spec, "lr")),
            epochs=int(self.spec.h("local_epochs")),
            seed=derive_seed(self.device_seed, round_no),
        )
        trained = self.model.get_weights()
        accumulated = {name: self.residual[name] + (trained[name] - start[name]) for name in start}
        order = magnitude_order(np.concatenate([a.reshape(-1) for a in accumulated.values()]))
        k = self.choose_k(accumulated, order)
        sent, self.residual = split_update(accumulated, first_k(order, k))
        metrics["sent_fraction"] = k / order.size if order.size else 0.0
        return FitResult(
            body={name: Coded(value, "topk") for name, value in sent.items()},
            num_samples=len(self.data.y_train),
            metrics=metrics,
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        return {RESIDUAL_PREFIX + name: r.copy() for name, r in self.residual.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        expected = {RESIDUAL_PREFIX + name: r.shape for name, r in self.residual.items()}
        if set(state) != set(expected):
            raise ValueError(f"top-k state: expected keys {sorted(expected)}, got {sorted(state)}")
        for key, shape in expected.items():
            value = np.asarray(state[key], dtype=np.float32)
            if value.shape != shape:
                raise ValueError(f"top-k state: {key}: expected shape {shape}, got {value.shape}")
            self.residual[key.removeprefix(RESIDUAL_PREFIX)] = value.copy()


class TopK(Strategy):
    name = "topk"
    description = "FedAvg whose uplink carries only the k largest update entries, with error feedback"
    defaults = DEFAULTS

    def server(self, spec: TaskSpec) -> ServerHalf:
        return TopKServer(spec)

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return TopKClient(spec, data)
