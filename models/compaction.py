"""Compaction: remove the units of a masked model that carry no weight, keeping its outputs.

After FedMask, a device's model is its mask applied to the frozen weights, so many weights are exact
zeros. When a whole unit (a conv output channel, a Linear neuron, an embedding dimension, an LSTM
hidden unit) provably contributes nothing, it is removed together with the matching inputs of the
next layer, and the model gets smaller and faster while computing the same function.

A unit is removed when either holds:

* **it always outputs exactly 0** ("dead"): its weights over the previous layer's live inputs are all
  zero and its bias is zero or absent. ReLU, Tanh, max/average pooling and flatten map 0 to 0, so
  the zeros reach the next weighted layer unchanged and the columns that read them can go;
* **nothing reads it** ("unused"): the next weighted layer's columns for it are all zero (over the
  units that layer keeps). A unit with a nonzero constant output (zero weights, nonzero bias) is
  only removed this way.

Flatten maps conv channel ``c`` of a ``[C, *spatial]`` activation to the block of features
``c*S .. (c+1)*S - 1`` (``S`` = spatial size), so a channel and its block go together.

LSTM (gates in PyTorch order i, f, g, o; ``c_t = f*c_{t-1} + i*g``, ``h_t = o*tanh(c_t)``, zero
initial state). Hidden unit ``k``:

* **is dead** when its cell-candidate row ``g_k`` has zero input weights (over live inputs), zero
  recurrent weights (over units not dead) and zero biases: then ``g_k = tanh(0) = 0`` at every step, so
  ``c_k`` stays 0 and ``h_k = o_k * tanh(0) = 0`` whatever its i, f, o gates do. Dead units may feed
  each other; the largest self-consistent dead set is found by fixed-point iteration.
* **is not dead** when only its input, forget or output gate rows are zero: a zero pre-activation
  gives ``sigmoid(0) = 0.5``, not 0, so ``h_k = 0.5 * tanh(c_k)`` is generally nonzero. Zero i/f/o
  rows are kept (they are sparse weights, not removable units).
* **is unused** when the next layer's column for ``h_k`` is zero and no kept unit reads ``h_k``
  through the recurrent weights (any gate); ``c_k`` only ever feeds ``h_k``, so the unit can go.
* Input features (e.g. embedding dimensions) whose ``W_ih`` column is zero in every gate of every
  kept unit are unused and removed from the previous layer.

A multi-layer ``nn.LSTM`` shares one hidden size across layers, so a compacted LSTM is rebuilt as a
`StackedLastStepLSTM` of single-layer LSTMs of their own widths.

Not removed: the model's input channels and output units (they are its interface). A hidden layer
keeps at least one unit, and with ``unit_multiple`` a multiple of that many, topping up with units
rebuilt all-zero (they output 0 and read nothing). Grouped convolutions are rejected.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

# Layers that act per channel and map an all-zero channel to an all-zero channel.
_ZERO_PRESERVING = (
    nn.ReLU,
    nn.Tanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Identity,
)
_CONV = (nn.Conv1d, nn.Conv2d)


class StackedLastStepLSTM(nn.Module):
    """Single-layer batch-first LSTMs, each of its own width, run in sequence; returns the output at
    the last time step, ``[B, hidden]``, like the zoo's ``LastStepLSTM``."""

    def __init__(self, layers: Sequence[nn.LSTM]) -> None:
        super().__init__()
        for layer in layers:
            if layer.num_layers != 1 or not layer.batch_first:
                raise ValueError("StackedLastStepLSTM takes single-layer, batch_first nn.LSTM modules")
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x, _ = layer(x)
        return x[:, -1]


def sequential_layers(plain: nn.Module) -> list[nn.Module]:
    """The layers of a plain model in execution order, nested ``nn.Sequential`` flattened."""
    if not isinstance(plain, nn.Sequential):
        raise TypeError(
            f"expected an nn.Sequential plain model (as MaskedNetwork.to_plain() returns), "
            f"got {type(plain).__name__}"
        )
    layers: list[nn.Module] = []
    for child in plain:
        layers.extend(sequential_layers(child) if isinstance(child, nn.Sequential) else [child])
    return layers


def lstm_layers(module: nn.Module) -> list[nn.LSTM] | None:
    """Single-layer views of a last-step LSTM block, or None if `module` is not one.

    Accepts `StackedLastStepLSTM` and any wrapper whose only child is a batch-first, unidirectional
    ``nn.LSTM`` without projection (the zoo's ``LastStepLSTM``). Layers of a multi-layer LSTM are
    copied out as separate single-layer modules.
    """
    if isinstance(module, StackedLastStepLSTM):
        return list(module.layers)
    if isinstance(module, nn.LSTM):
        raise TypeError("a bare nn.LSTM returns a tuple; wrap it so the block returns the last time step")
    children = list(module.children())
    if len(children) != 1 or not isinstance(children[0], nn.LSTM):
        return None
    lstm = children[0]
    if not lstm.batch_first or lstm.bidirectional or lstm.proj_size:
        raise ValueError(
            f"{type(module).__name__}: only batch_first, unidirectional LSTMs without projection are "
            f"supported (batch_first={lstm.batch_first}, bidirectional={lstm.bidirectional}, "
            f"proj_size={lstm.proj_size})"
        )
    if lstm.num_layers == 1:
        return [lstm]
    layers = []
    for k in range(lstm.num_layers):
        single = nn.LSTM(
            getattr(lstm, f"weight_ih_l{k}").shape[1], lstm.hidden_size, bias=lstm.bias, batch_first=True
        )
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if hasattr(lstm, f"{name}_l{k}"):
                    getattr(single, f"{name}_l0").copy_(getattr(lstm, f"{name}_l{k}"))
        layers.append(single.to(lstm.weight_ih_l0.dtype))
    return layers


@dataclass(frozen=True)
class LayerCompaction:
    """Units of one weighted layer before and after compaction."""

    name: str
    kind: str
    units_before: int
    units_after: int
    zero_units: int  # of units_after: all-zero units kept to round the width (see `compact`)
    params_before: int
    params_after: int


@dataclass(frozen=True)
class CompactionReport:
    """What compaction removed: parameter counts of the whole model and units per weighted layer."""

    params_before: int
    params_after: int
    nonzero_params: int
    layers: tuple[LayerCompaction, ...]

    @property
    def size_ratio(self) -> float:
        """Parameters before over parameters after (> 1 means smaller)."""
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "size_ratio": self.size_ratio}

    def format_table(self) -> str:
        lines = [f"{'layer':<16}{'kind':<12}{'units':>26}{'params':>24}"]
        for layer in self.layers:
            units = f"{layer.units_before} -> {layer.units_after}"
            if layer.zero_units:
                units += f" ({layer.zero_units} zero)"
            params = f"{layer.params_before} -> {layer.params_after}"
            lines.append(f"{layer.name:<16}{layer.kind:<12}{units:>26}{params:>24}")
        lines.append(
            f"total params {self.params_before} -> {self.params_after} "
            f"({self.size_ratio:.2f}x smaller; {self.nonzero_params} nonzero)"
        )
        return "\n".join(lines)


def compact(plain: nn.Module, *, unit_multiple: int = 1) -> nn.Module:
    """A smaller model computing the same function as `plain`, with weightless units removed.

    With `unit_multiple` > 1 every hidden layer keeps a multiple of that many units, topping up with
    all-zero units (which output exactly 0): a runtime that computes output channels in SIMD blocks
    (XNNPACK: 8 or 16 floats) gets no faster from a partial block and can get slower with an odd
    width, so a block-aligned width is often the faster model for a few more bytes.
    """
    return compact_with_report(plain, unit_multiple=unit_multiple)[0]


def compact_with_report(
    plain: nn.Module, *, unit_multiple: int = 1
) -> tuple[nn.Sequential, CompactionReport]:
    """`compact`, also returning what was removed per layer."""
    if isinstance(unit_multiple, bool) or not isinstance(unit_multiple, int) or unit_multiple < 1:
        raise ValueError(f"unit_multiple: expected an integer >= 1, got {unit_multiple!r}")
    layers = sequential_layers(plain)
    nodes = _weighted_nodes(layers)
    if not nodes:
        raise ValueError("the model has no Conv/Linear/Embedding/LSTM layer to compact")
    with torch.no_grad():
        _mark_live(nodes)
        _mark_kept(nodes, unit_multiple)
        rebuilt = _rebuild(layers, nodes)
    compacted = nn.Sequential(*rebuilt).eval()
    report = CompactionReport(
        params_before=_count(plain),
        params_after=_count(compacted),
        nonzero_params=sum(int(torch.count_nonzero(p)) for p in plain.parameters()),
        layers=tuple(
            LayerCompaction(
                n.name,
                n.kind,
                n.units,
                int(n.kept.sum()),
                int(n.zeroed.sum()),
                n.params(),
                n.params(n.kept_in, n.kept),
            )
            for n in nodes
        ),
    )
    return compacted, report


# -- the graph of weighted layers ------------------------------------------------------------------


class _Node:
    """One weighted layer (one layer of a stacked LSTM counts as one) and its unit bookkeeping.

    Masks are boolean numpy vectors: `live` over output units (not provably zero), `kept` over output
    units (live and read by someone, plus `zeroed` ones), `zeroed` over output units kept only to
    round the width (or avoid an empty layer) and rebuilt all-zero, `kept_in` over input features.
    """

    kind = ""
    units: int  # output units; set by the subclass before calling __init__
    in_features: int

    def __init__(self, name: str, layer_index: int) -> None:
        self.name = name
        self.layer_index = layer_index
        self.in_block = 1  # input features per output unit of the previous node (flatten)
        self.live = np.ones(self.units, dtype=bool)
        self.kept = np.ones(self.units, dtype=bool)
        self.kept_in = np.ones(self.in_features, dtype=bool)
        self.zeroed = np.zeros(self.units, dtype=bool)

    def mark_live(self, live_in: np.ndarray) -> None:
        raise NotImplementedError

    def keep(self, read_by_next: np.ndarray | None, unit_multiple: int) -> None:
        """Choose kept units; `read_by_next` is None for the last node (its outputs are the model's)."""
        if read_by_next is None:
            self.kept = np.ones(self.units, dtype=bool)
            return
        self.kept = self.live & read_by_next
        # Top up to a multiple of `unit_multiple`, and to at least one unit rather than an empty
        # tensor, with units rebuilt all-zero: they output 0 and read nothing upstream.
        count = int(self.kept.sum())
        target = min(self.units, max(1, -(-count // unit_multiple) * unit_multiple))
        self.zeroed = np.zeros(self.units, dtype=bool)
        self.zeroed[np.flatnonzero(~self.kept)[: target - count]] = True
        self.kept |= self.zeroed

    def inputs_read(self) -> np.ndarray:
        """Input features that some kept (not zeroed) unit reads with a nonzero weight."""
        return self._inputs_read(self.kept & ~self.zeroed)

    def _inputs_read(self, active: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rebuild(self) -> nn.Module:
        """The layer with only the kept units and inputs (zeroed units all zero)."""
        layer = self._rebuild()
        positions = np.flatnonzero(self.zeroed[self.kept])
        if len(positions):
            self._zero_units(layer, torch.from_numpy(positions))
        return layer

    def _rebuild(self) -> nn.Module:
        raise NotImplementedError

    def _zero_units(self, layer: nn.Module, positions: torch.Tensor) -> None:
        raise NotImplementedError

    def params(self, kept_in: np.ndarray | None = None, kept: np.ndarray | None = None) -> int:
        raise NotImplementedError


def _nonzero(t: torch.Tensor | None) -> np.ndarray:
    return np.zeros(0, dtype=bool) if t is None else (t != 0).cpu().numpy()


class _DenseNode(_Node):
    """Conv1d, Conv2d or Linear: output unit = weight row (conv filter), input = column."""

    def __init__(self, name: str, layer_index: int, layer: nn.Module) -> None:
        if isinstance(layer, _CONV) and layer.groups != 1:
            raise ValueError(f"{name}: grouped convolutions (groups={layer.groups}) cannot be compacted")
        self.layer = layer
        self.kind = type(layer).__name__
        w = layer.weight
        self.units, self.in_features = w.shape[0], w.shape[1]
        # [out, in]: does unit u read input i through any kernel position
        self.reads = _nonzero(w.reshape(w.shape[0], w.shape[1], -1)).any(axis=2)
        self.has_bias = layer.bias is not None
        self.bias_nonzero = _nonzero(layer.bias) if self.has_bias else np.zeros(self.units, dtype=bool)
        self.kernel = int(np.prod(w.shape[2:], dtype=np.int64))
        super().__init__(name, layer_index)

    def mark_live(self, live_in: np.ndarray) -> None:
        self.live = self.reads[:, live_in].any(axis=1) | self.bias_nonzero

    def _inputs_read(self, active: np.ndarray) -> np.ndarray:
        return self.reads[active].any(axis=0)

    def _zero_units(self, layer: nn.Module, positions: torch.Tensor) -> None:
        layer.weight[positions] = 0
        if layer.bias is not None:
            layer.bias[positions] = 0

    def params(self, kept_in: np.ndarray | None = None, kept: np.ndarray | None = None) -> int:
        n_out = self.units if kept is None else int(kept.sum())
        n_in = self.in_features if kept_in is None else int(kept_in.sum())
        return n_out * n_in * self.kernel + (n_out if self.has_bias else 0)

    def _rebuild(self) -> nn.Module:
        layer, out_idx, in_idx = self.layer, _index(self.kept), _index(self.kept_in)
        weight = layer.weight[out_idx][:, in_idx]
        bias = layer.bias[out_idx] if self.has_bias else None
        if isinstance(layer, nn.Linear):
            new = nn.Linear(len(in_idx), len(out_idx), bias=self.has_bias)
        else:
            new = type(layer)(
                len(in_idx),
                len(out_idx),
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                bias=self.has_bias,
                padding_mode=layer.padding_mode,
            )
        new = new.to(dtype=weight.dtype, device=weight.device)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
        return new


class _EmbeddingNode(_Node):
    """Embedding: output unit = embedding dimension (a column of the table); no input features."""

    kind = "Embedding"

    def __init__(self, name: str, layer_index: int, layer: nn.Embedding) -> None:
        self.layer = layer
        self.units, self.in_features = layer.embedding_dim, 0
        super().__init__(name, layer_index)

    def mark_live(self, live_in: np.ndarray) -> None:
        self.live = _nonzero(self.layer.weight).any(axis=0)

    def _inputs_read(self, active: np.ndarray) -> np.ndarray:
        return np.zeros(0, dtype=bool)

    def _zero_units(self, layer: nn.Module, positions: torch.Tensor) -> None:
        layer.weight[:, positions] = 0

    def params(self, kept_in: np.ndarray | None = None, kept: np.ndarray | None = None) -> int:
        return self.layer.num_embeddings * (self.units if kept is None else int(kept.sum()))

    def _rebuild(self) -> nn.Module:
        layer = self.layer
        return nn.Embedding.from_pretrained(
            layer.weight[:, _index(self.kept)].clone(),
            freeze=not layer.weight.requires_grad,
            padding_idx=layer.padding_idx,
            max_norm=layer.max_norm,
            norm_type=layer.norm_type,
            scale_grad_by_freq=layer.scale_grad_by_freq,
            sparse=layer.sparse,
        )


class _LSTMNode(_Node):
    """One single-layer LSTM: output unit = hidden unit k (gate rows k, H+k, 2H+k, 3H+k)."""

    kind = "LSTM"

    def __init__(self, name: str, layer_index: int, lstm: nn.LSTM) -> None:
        self.lstm = lstm
        self.units, self.in_features = lstm.hidden_size, lstm.input_size
        h = self.units
        w_ih, w_hh = _nonzero(lstm.weight_ih_l0), _nonzero(lstm.weight_hh_l0)
        self.has_bias = lstm.bias
        bias = np.zeros(4 * h, dtype=bool)
        if lstm.bias:
            bias = _nonzero(lstm.bias_ih_l0) | _nonzero(lstm.bias_hh_l0)
        # per gate [4, H, ...] views of which weights are nonzero
        self.ih = w_ih.reshape(4, h, -1)
        self.hh = w_hh.reshape(4, h, h)
        self.bias = bias.reshape(4, h)
        super().__init__(name, layer_index)

    def mark_live(self, live_in: np.ndarray) -> None:
        gate_g = 2
        dead = ~(self.ih[gate_g][:, live_in].any(axis=1) | self.bias[gate_g])
        while True:  # shrink to the largest set whose g rows read only dead units
            reads_live = self.hh[gate_g][:, ~dead].any(axis=1)
            still = dead & ~reads_live
            if (still == dead).all():
                break
            dead = still
        self.live = ~dead

    def keep(self, read_by_next: np.ndarray | None, unit_multiple: int) -> None:
        if read_by_next is None:
            super().keep(None, unit_multiple)
            return
        unused = self.live & ~read_by_next
        while True:  # shrink to units read neither downstream nor by any other kept unit
            kept = self.live & ~unused
            read_recurrently = self.hh[:, kept, :].any(axis=(0, 1))
            still = unused & ~read_recurrently
            if (still == unused).all():
                break
            unused = still
        super().keep(~unused, unit_multiple)

    def _inputs_read(self, active: np.ndarray) -> np.ndarray:
        return self.ih[:, active, :].any(axis=(0, 1))

    def _zero_units(self, layer: nn.Module, positions: torch.Tensor) -> None:
        # all four gate rows: g = tanh(0) = 0 keeps the cell and the output at 0
        rows = torch.cat([positions + gate * layer.hidden_size for gate in range(4)])
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            if hasattr(layer, name):
                getattr(layer, name)[rows] = 0

    def params(self, kept_in: np.ndarray | None = None, kept: np.ndarray | None = None) -> int:
        h = self.units if kept is None else int(kept.sum())
        n_in = self.in_features if kept_in is None else int(kept_in.sum())
        return 4 * h * (n_in + h) + (8 * h if self.has_bias else 0)

    def _rebuild(self) -> nn.LSTM:
        lstm, h = self.lstm, self.units
        units, in_idx = _index(self.kept), _index(self.kept_in)
        rows = torch.cat([units + gate * h for gate in range(4)])
        new = nn.LSTM(len(in_idx), len(units), bias=self.has_bias, batch_first=True)
        new = new.to(dtype=lstm.weight_ih_l0.dtype, device=lstm.weight_ih_l0.device)
        new.weight_ih_l0.copy_(lstm.weight_ih_l0[rows][:, in_idx])
        new.weight_hh_l0.copy_(lstm.weight_hh_l0[rows][:, units])
        if self.has_bias:
            new.bias_ih_l0.copy_(lstm.bias_ih_l0[rows])
            new.bias_hh_l0.copy_(lstm.bias_hh_l0[rows])
        return new


def _index(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(mask))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _weighted_nodes(layers: list[nn.Module]) -> list[_Node]:
    nodes: list[_Node] = []
    flatten_since_last = False
    for i, layer in enumerate(layers):
        name = f"{i}"
        stack = None if isinstance(layer, (*_CONV, nn.Linear, nn.Embedding)) else lstm_layers(layer)
        if isinstance(layer, (*_CONV, nn.Linear)):
            new: list[_Node] = [_DenseNode(name, i, layer)]
        elif isinstance(layer, nn.Embedding):
            if nodes:
                raise ValueError(f"layer {i}: an Embedding is only supported as the first weighted layer")
            new = [_EmbeddingNode(name, i, layer)]
        elif stack is not None:
            new = [_LSTMNode(f"{i}.l{k}" if len(stack) > 1 else name, i, s) for k, s in enumerate(stack)]
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                raise ValueError(f"layer {i}: only Flatten(start_dim=1, end_dim=-1) is supported")
            flatten_since_last = True
            continue
        elif isinstance(layer, _ZERO_PRESERVING):
            continue
        else:
            raise TypeError(
                f"layer {i}: {type(layer).__name__} is not supported by compaction (expected Conv1d/Conv2d, "
                f"Linear, Embedding, a last-step LSTM, Flatten, ReLU/Tanh, pooling or Dropout)"
            )
        for node in new:
            if nodes:
                _connect(nodes[-1], node, flatten_since_last)
            flatten_since_last = False
            nodes.append(node)
    return nodes


def _connect(prev: _Node, node: _Node, through_flatten: bool) -> None:
    """Record how many of `node`'s input features each output unit of `prev` feeds."""
    if node.in_features % prev.units != 0 or (node.in_features != prev.units and not through_flatten):
        raise ValueError(
            f"layer {node.name} ({node.kind}) has {node.in_features} input features, which do not match "
            f"the {prev.units} output units of layer {prev.name} ({prev.kind})"
        )
    node.in_block = node.in_features // prev.units


def _mark_live(nodes: list[_Node]) -> None:
    """Forward pass: which units can be nonzero, given which inputs can be."""
    live_in = np.ones(nodes[0].in_features, dtype=bool)
    for node, following in zip(nodes, [*nodes[1:], None]):
        node.mark_live(live_in)
        if following is not None:
            live_in = np.repeat(node.live, following.in_block)


def _mark_kept(nodes: list[_Node], unit_multiple: int) -> None:
    """Backward pass: keep live units that a kept unit downstream reads; then align the inputs."""
    read_by_next: np.ndarray | None = None
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        node.keep(read_by_next, unit_multiple)
        if i > 0:
            read_by_next = node.inputs_read().reshape(nodes[i - 1].units, node.in_block).any(axis=1)
    for prev, node in itertools.pairwise(nodes):
        node.kept_in = np.repeat(prev.kept, node.in_block)


def _rebuild(layers: list[nn.Module], nodes: list[_Node]) -> list[nn.Module]:
    by_layer: dict[int, list[_Node]] = {}
    for node in nodes:
        by_layer.setdefault(node.layer_index, []).append(node)
    rebuilt: list[nn.Module] = []
    for i, layer in enumerate(layers):
        group = by_layer.get(i)
        if group is None:
            rebuilt.append(copy.deepcopy(layer))
        elif isinstance(group[0], _LSTMNode):
            rebuilt.append(StackedLastStepLSTM([n.rebuild() for n in group]))
        else:
            rebuilt.append(group[0].rebuild())
    return rebuilt
