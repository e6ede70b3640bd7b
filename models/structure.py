"""Structured sparsity on mask scores: whole units pruned to a budget, and a floor under every kept unit.

Compaction (``models.compaction``) can only shrink a model by whole units (a conv output channel, a
Linear neuron), so per-weight sparsity alone never makes a device's model smaller or faster.
``enforce_structure(model, keep, floor)`` lines a ``MaskedNetwork``'s mask up into removable units:

* **pruning**: in every masked hidden Conv/Linear layer, rank the output units by their mean keep
  probability ``mean(sigmoid(s))`` and switch off all but the ``ceil(keep * units)`` strongest (their
  scores go negative, so the deterministic mask is 0), together with the next layer's inputs that read
  a pruned unit (useless weights). The output layer is never pruned: its units are the classes.
* **a floor**: every kept unit keeps at least ``ceil(floor * live inputs)`` weights (its strongest
  scores are lifted just above the threshold). Without it a strong sparsity pull can empty a class row
  and leave a device that never predicts a class it has data for; with it a kept unit never dies by
  accident, so the budget alone decides the model's size.

LSTM and embedding layers are left alone (their units span several gate blocks; see compaction).
Scores move only where they must, and only just across the threshold: a score that already agrees
keeps its value, so a device's confidence survives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from fedmask.models.layers import MaskedConv1d, MaskedConv2d, MaskedLayer, MaskedLinear
from fedmask.models.network import MaskedNetwork

_UNIT_LAYERS = (MaskedConv1d, MaskedConv2d, MaskedLinear)
# Where a lifted or lowered score lands: just across the threshold, so a later step can still move it.
_NUDGE = 0.05


@dataclass(frozen=True)
class UnitLayer:
    """A masked Conv/Linear layer whose output units may be pruned, and the masked layer reading them."""

    name: str
    layer: MaskedLayer
    consumer: MaskedLayer | None  # the next masked Conv/Linear layer, if it reads this one directly
    is_output: bool


def unit_layers(model: MaskedNetwork) -> list[UnitLayer]:
    """Masked Conv/Linear layers with per-weight scores, in forward order; the last one is the output."""
    layers = model.layers()
    out: list[UnitLayer] = []
    for index, (name, layer) in enumerate(layers):
        if not (isinstance(layer, _UNIT_LAYERS) and layer.masked and layer.config.granularity == "weight"):
            continue
        nxt = layers[index + 1][1] if index + 1 < len(layers) else None
        consumer = nxt if isinstance(nxt, _UNIT_LAYERS) and nxt.masked else None
        if consumer is not None and _in_units(consumer) % _out_units(layer):
            consumer = None  # not a plain channel/feature mapping: leave the next layer alone
        out.append(UnitLayer(name, layer, consumer, is_output=index == len(layers) - 1))
    return out


def _out_units(layer: MaskedLayer) -> int:
    return layer.specs[0].shape[0]


def _in_units(layer: MaskedLayer) -> int:
    return layer.specs[0].shape[1]


def _rows(layer: MaskedLayer) -> torch.Tensor:
    """The weight scores as ``[units, fan_in]`` (a view: writes go to the layer)."""
    scores = layer.scores["weight"]
    return scores.data.view(scores.shape[0], -1)


def _columns(consumer: MaskedLayer, units: int) -> torch.Tensor:
    """The consumer's scores as ``[out, units, block]``: block ``j`` holds every weight reading unit ``j``
    (a conv input channel's kernel taps, or the ``S`` flattened positions of a conv channel)."""
    scores = consumer.scores["weight"]
    return scores.data.view(scores.shape[0], units, -1)


def unit_strength(layer: MaskedLayer) -> torch.Tensor:
    """Mean keep probability per output unit."""
    return torch.sigmoid(_rows(layer)).mean(dim=1)


def units_kept(layer: MaskedLayer) -> torch.Tensor:
    """Bool per output unit: does its current mask keep any weight."""
    return (_rows(layer) > 0).any(dim=1)


@torch.no_grad()
def enforce_structure(
    model: MaskedNetwork,
    keep: float = 1.0,
    floor: float = 0.0,
    layers: tuple[str, ...] = ("*",),
    output_floor: float | None = None,
) -> dict[str, int]:
    """Prune each hidden layer to its ``ceil(keep * units)`` strongest units and floor every kept unit.

    ``output_floor`` (default ``floor``) is the floor of the output layer's class rows.
    Only hidden layers matching one of the fnmatch patterns ``layers`` are pruned (all are floored).
    Returns the number of units kept per layer. Kept units are exactly the budget: a kept unit keeps at
    least ``ceil(floor * live inputs)`` weights (``live``: not reading a pruned unit), so no unit dies by
    accident and the model's size is the budget's, the same on every device with the same budget.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"enforce_structure: keep must be in (0, 1], got {keep}")
    output_floor = floor if output_floor is None else output_floor
    for name, value in (("floor", floor), ("output_floor", output_floor)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"enforce_structure: {name} must be in [0, 1], got {value}")
    kept: dict[str, int] = {}
    dead_in: torch.Tensor | None = None  # pruned units of the previous layer, if this layer reads them
    for unit in unit_layers(model):
        rows = _rows(unit.layer)
        n = rows.shape[0]
        alive = torch.ones(n, dtype=torch.bool)
        if not unit.is_output and any(fnmatchcase(unit.name, p) for p in layers):
            k = max(1, math.ceil(keep * n - 1e-9))
            # Stable order: ties (a mask still all ones) go to the lower index, the same on every device.
            order = torch.argsort(-unit_strength(unit.layer), stable=True)
            alive[order[k:]] = False
            rows[~alive] = -rows[~alive].abs().clamp(min=_NUDGE)
        row_floor = output_floor if unit.is_output else floor
        if row_floor > 0.0:
            _floor_rows(rows, alive, dead_in, row_floor)
        kept[unit.name] = int(alive.sum())
        if unit.consumer is not None:
            cols = _columns(unit.consumer, n)
            cols[:, ~alive] = -cols[:, ~alive].abs().clamp(min=_NUDGE)
            dead_in = ~alive
        else:
            dead_in = None
    return kept


def _floor_rows(rows: torch.Tensor, alive: torch.Tensor, dead_in: torch.Tensor | None, floor: float) -> None:
    """Lift the strongest scores of each alive row until it keeps ``ceil(floor * live inputs)``."""
    candidates = rows.clone()
    live_inputs = rows.shape[1]
    if dead_in is not None:
        cols = candidates.view(rows.shape[0], dead_in.numel(), -1)
        cols[:, dead_in] = -math.inf  # never lift a weight that reads a pruned unit
        live_inputs = int((~dead_in).sum()) * cols.shape[2]
    k = min(live_inputs, max(1, math.ceil(floor * live_inputs - 1e-9)))
    top = torch.topk(candidates, k, dim=1)
    lift = alive.unsqueeze(1) & (top.values <= 0)
    if bool(lift.any()):
        lifted = torch.where(lift, top.values.abs().clamp(min=_NUDGE), top.values)
        rows.scatter_(1, top.indices, lifted)
