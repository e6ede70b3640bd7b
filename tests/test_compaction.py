"""Compaction removes exactly the units that carry no weight and keeps the model's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedmask.models.compaction import (
    StackedLastStepLSTM,
    compact,
    compact_with_report,
    lstm_layers,
)
from fedmask.models.layers import LastStepLSTM, MaskConfig
from fedmask.models.zoo import ARCHITECTURES, build_model

TOLERANCE = 1e-5


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def _zero_rows(layer: nn.Module, rows: list[int]) -> None:
    with torch.no_grad():
        layer.weight[rows] = 0
        if layer.bias is not None:
            layer.bias[rows] = 0


def _cnn(bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 16, bias=bias),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(16, 5, bias=bias),
    ).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_dead_channels_and_neurons_go_with_the_next_layers_inputs(bias: bool) -> None:
    model = _cnn(bias)
    _zero_rows(model[0], [1, 4])  # conv1 channels 1 and 4 always output 0
    _zero_rows(model[3], [2])  # conv2 channel 2 -> a block of 16 flattened features
    _zero_rows(model[7], [0, 3, 5])
    compacted, report = compact_with_report(model)

    assert [(layer.units_before, layer.units_after) for layer in report.layers] == [
        (8, 6),
        (6, 5),
        (16, 13),
        (5, 5),  # the outputs are the model's interface
    ]
    conv1, conv2, fc1, fc2 = (compacted[i] for i in (0, 3, 7, 10))
    assert conv1.weight.shape == (6, 3, 3, 3)
    assert conv2.weight.shape == (5, 6, 3, 3)
    assert fc1.weight.shape == (13, 5 * 16)  # flatten: one 4x4 block per kept channel
    assert fc2.weight.shape == (5, 13)
    assert (fc2.bias is None) is not bias
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in compacted.parameters())
    x = torch.rand(32, 3, 16, 16)
    assert _max_diff(model, compacted, x) <= TOLERANCE


def test_flatten_block_of_a_removed_channel_is_the_right_block() -> None:
    model = _cnn(bias=False)
    _zero_rows(model[3], [4])
    # Channel 4's block of fc1 inputs holds the only large weights: if compaction dropped another
    # block instead, outputs would change a lot.
    with torch.no_grad():
        model[7].weight[:, 4 * 16 : 5 * 16] = 100.0
    compacted = compact(model)
    assert compacted[7].weight.shape[1] == 5 * 16
    assert torch.all(compacted[7].weight.abs() < 100.0)
    assert _max_diff(model, compacted, torch.rand(8, 3, 16, 16)) <= TOLERANCE


def test_units_nobody_reads_are_removed_even_with_nonzero_weights() -> None:
    model = _cnn(bias=False)
    with torch.no_grad():
        model[10].weight[:, [2, 7]] = 0  # fc1 neurons 2 and 7 feed nothing
        model[3].weight[:, 5] = 0  # conv1 channel 5 feeds nothing
    compacted, report = compact_with_report(model)
    assert [layer.units_after for layer in report.layers] == [7, 6, 14, 5]
    assert _max_diff(model, compacted, torch.rand(8, 3, 16, 16)) <= TOLERANCE


def test_a_unit_with_zero_weights_but_a_bias_is_a_constant_and_stays() -> None:
    model = _cnn(bias=True)
    with torch.no_grad():
        model[7].weight[3] = 0
        model[7].bias[3] = 0.5  # outputs relu(0.5) = 0.5 for every input
    compacted, report = compact_with_report(model)
    assert report.layers[2].units_after == 16
    assert _max_diff(model, compacted, torch.rand(8, 3, 16, 16)) <= TOLERANCE


def test_conv1d_model_like_har() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv1d(3, 8, 5, padding=2, bias=False),
        nn.ReLU(),
        nn.MaxPool1d(4),
        nn.Conv1d(8, 8, 5, padding=2, bias=False),
        nn.ReLU(),
        nn.MaxPool1d(4),
        nn.Flatten(),
        nn.Linear(8 * 8, 10, bias=False),
    ).eval()
    _zero_rows(model[0], [0, 1, 2])
    _zero_rows(model[3], [7])
    compacted, report = compact_with_report(model)
    assert [layer.units_after for layer in report.layers] == [5, 7, 10]
    assert compacted[7].weight.shape == (10, 7 * 8)
    assert _max_diff(model, compacted, torch.randn(16, 3, 128)) <= TOLERANCE


def test_all_zero_layer_keeps_one_unit_so_no_tensor_is_empty() -> None:
    model = _cnn(bias=False)
    _zero_rows(model[7], list(range(16)))
    compacted, report = compact_with_report(model)
    assert report.layers[2].units_after == 1
    # nothing reaches the classifier, and nothing upstream is read any more
    assert [layer.units_after for layer in report.layers[:2]] == [1, 1]
    assert _max_diff(model, compacted, torch.rand(4, 3, 16, 16)) == 0.0


def test_unit_multiple_tops_up_with_all_zero_units() -> None:
    model = _cnn(bias=True)
    _zero_rows(model[0], [1, 4, 6])  # conv1 keeps 5 of 8
    _zero_rows(model[7], [0, 3, 5])  # fc1 keeps 13 of 16
    compacted, report = compact_with_report(model, unit_multiple=4)
    assert [(layer.units_after, layer.zero_units) for layer in report.layers] == [
        (8, 3),  # 5 rounded up to 8 (capped at the layer's width)
        (6, 0),  # 6 cannot round to 8 beyond its 6 units
        (16, 3),
        (5, 0),  # the output layer is never padded
    ]
    # the padding units are exactly zero, weights and biases, and outputs are unchanged
    fc1 = compacted[7]
    assert int((fc1.weight.abs().sum(dim=1) + fc1.bias.abs() == 0).sum()) == 3
    assert _max_diff(model, compacted, torch.rand(8, 3, 16, 16)) <= TOLERANCE
    with pytest.raises(ValueError, match="unit_multiple"):
        compact(model, unit_multiple=0)


def test_unit_multiple_pads_lstm_units_with_zero_gates() -> None:
    model = _lstm_model()
    _zero_gate(model, unit=2, gates="g")
    _zero_gate(model, unit=4, gates="g")
    compacted, report = compact_with_report(model, unit_multiple=5)
    assert (report.layers[1].units_after, report.layers[1].zero_units) == (5, 1)
    assert _max_diff(model, compacted, _tokens()) <= TOLERANCE


def test_nested_sequential_is_flattened() -> None:
    model = _cnn(bias=False)
    nested = nn.Sequential(nn.Sequential(*model[:3]), nn.Sequential(*model[3:])).eval()
    _zero_rows(model[0], [2])
    compacted = compact(nested)
    assert compacted[0].weight.shape[0] == 7
    assert _max_diff(nested, compacted, torch.rand(4, 3, 16, 16)) <= TOLERANCE


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"layer 1: BatchNorm2d is not supported"):
        compact(model)
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        compact(nn.Linear(3, 4))


def test_grouped_convolution_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="grouped"):
        compact(model)


# -- LSTM -------------------------------------------------------------------------------------------

H = 6
GATE = {"i": 0, "f": 1, "g": 2, "o": 3}


class BiasedLastStepLSTM(nn.Module):
    """Like the zoo's LastStepLSTM, with biases (compaction must treat them right too)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, bias=True, batch_first=True)
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias"):
                    p.normal_(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0][:, -1]


def _lstm_model(num_layers: int = 1, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Embedding(20, 5),
        BiasedLastStepLSTM(5, H, num_layers),
        nn.Linear(H, 20, bias=False),
    ).eval()


def _zero_gate(model: nn.Sequential, unit: int, gates: str, layer: int = 0) -> None:
    lstm = model[1].lstm
    with torch.no_grad():
        for gate in gates:
            row = GATE[gate] * H + unit
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(lstm, f"{name}_l{layer}")[row] = 0


def _tokens(n: int = 16) -> torch.Tensor:
    return torch.randint(0, 20, (n, 12), generator=torch.Generator().manual_seed(3))


def test_lstm_unit_with_zero_cell_gate_row_is_dead_and_removed() -> None:
    model = _lstm_model()
    _zero_gate(model, unit=2, gates="g")  # g = tanh(0) = 0, so c and h stay 0
    compacted, report = compact_with_report(model)
    assert report.layers[1].units_after == H - 1
    (lstm,) = lstm_layers(compacted[1])
    assert lstm.weight_hh_l0.shape == (4 * (H - 1), H - 1)
    assert compacted[2].weight.shape == (20, H - 1)
    assert _max_diff(model, compacted, _tokens()) <= TOLERANCE


@pytest.mark.parametrize("gates", ["i", "f", "o", "ifo"])
def test_lstm_unit_with_only_input_forget_output_rows_zero_is_not_dead(gates: str) -> None:
    model = _lstm_model()
    _zero_gate(model, unit=2, gates=gates)
    _, report = compact_with_report(model)
    assert report.layers[1].units_after == H
    # and rightly so: sigmoid(0) = 0.5, so the unit still outputs 0.5 * tanh(c) (or more)
    with torch.no_grad():
        hidden, _ = model[1].lstm(model[0](_tokens()))
    assert hidden[:, -1, 2].abs().max() > 1e-3


def test_lstm_units_that_only_feed_each_other_are_dead_together() -> None:
    model = _lstm_model()
    lstm = model[1].lstm
    g_rows = [GATE["g"] * H + 1, GATE["g"] * H + 4]
    with torch.no_grad():
        for row in g_rows:
            lstm.weight_ih_l0[row] = 0
            lstm.bias_ih_l0[row] = 0
            lstm.bias_hh_l0[row] = 0
            lstm.weight_hh_l0[row] = 0
        lstm.weight_hh_l0[g_rows[0], 4] = 1.0  # unit 1's cell reads unit 4 ...
        lstm.weight_hh_l0[g_rows[1], 1] = 1.0  # ... and unit 4's reads unit 1: both stay 0
    compacted, report = compact_with_report(model)
    assert report.layers[1].units_after == H - 2
    assert _max_diff(model, compacted, _tokens()) <= TOLERANCE


def test_lstm_unit_nobody_reads_is_removed_unless_read_recurrently() -> None:
    model = _lstm_model()
    with torch.no_grad():
        model[2].weight[:, 3] = 0  # the classifier ignores h_3
        model[1].lstm.weight_hh_l0[:, 3] = 0  # and so does every gate
    compacted, report = compact_with_report(model)
    assert report.layers[1].units_after == H - 1
    assert _max_diff(model, compacted, _tokens()) <= TOLERANCE

    model = _lstm_model()
    with torch.no_grad():
        model[2].weight[:, 3] = 0  # h_3 still feeds other units' gates: it must stay
    assert compact_with_report(model)[1].layers[1].units_after == H


def test_embedding_dimension_no_gate_reads_is_removed() -> None:
    model = _lstm_model()
    with torch.no_grad():
        model[1].lstm.weight_ih_l0[:, 3] = 0
        model[0].weight[:, 1] = 0  # dim 1 is always 0
    compacted, report = compact_with_report(model)
    assert report.layers[0].units_after == 3
    assert compacted[0].weight.shape == (20, 3)
    assert lstm_layers(compacted[1])[0].weight_ih_l0.shape == (4 * H, 3)
    assert _max_diff(model, compacted, _tokens()) <= TOLERANCE


def test_stacked_lstm_layers_get_their_own_widths() -> None:
    model = _lstm_model(num_layers=2)
    _zero_gate(model, unit=0, gates="g", layer=0)
    _zero_gate(model, unit=1, gates="g", layer=0)
    _zero_gate(model, unit=5, gates="g", layer=1)
    compacted, report = compact_with_report(model)
    assert isinstance(compacted[1], StackedLastStepLSTM)
    assert [layer.units_after for layer in report.layers] == [5, H - 2, H - 1, 20]
    _, second = lstm_layers(compacted[1])
    assert second.weight_ih_l0.shape == (4 * (H - 1), H - 2)
    assert _max_diff(model, compacted, _tokens()) <= TOLERANCE


# -- zoo models, real inputs -----------------------------------------------------------------------

ZOO = [
    ("har_cnn", {}, 14),
    ("femnist_cnn", {"width": 0.25}, 62),
    ("conv4", {"width": 0.25}, 10),
    ("conv6", {"width": 0.25}, 10),
    ("char_lstm_small", {}, 81),
]


def unit_masked_plain(arch: str, kwargs: dict, classes: int, keep: float = 0.6, seed: int = 0):
    """A zoo model with a random unit-level mask (whole rows dropped), as a plain model."""
    network = build_model(arch, seed, classes, MaskConfig(granularity="unit"), **kwargs)
    rng = np.random.default_rng(seed)
    network.set_mask(rng.random(network.num_mask_bits) < keep)
    return network, network.to_plain()


@pytest.mark.parametrize(("arch", "kwargs", "classes"), ZOO, ids=[z[0] for z in ZOO])
def test_zoo_models_compact_without_changing_outputs_on_real_inputs(
    arch, kwargs, classes, real_inputs
) -> None:
    network, plain = unit_masked_plain(arch, kwargs, classes)
    compacted, report = compact_with_report(plain)
    x = torch.from_numpy(real_inputs(arch, 100))
    assert ARCHITECTURES[arch].input_shape == tuple(x.shape[1:])
    assert _max_diff(plain, compacted, x) <= TOLERANCE
    assert report.params_after < report.params_before
    # every unit the mask dropped is gone (the output layer keeps all its units)
    for layer, bound in zip(report.layers[:-1], _units_the_mask_leaves(network)):
        assert layer.units_after <= bound, layer
    assert report.layers[-1].units_after == report.layers[-1].units_before


def test_zoo_lstm_without_biases_compacts(real_inputs) -> None:
    _, plain = unit_masked_plain("char_lstm_small", {}, 81, keep=0.5, seed=1)
    assert isinstance(plain[1], LastStepLSTM)
    compacted = compact(plain)
    assert isinstance(compacted[1], StackedLastStepLSTM)
    assert _max_diff(plain, compacted, torch.from_numpy(real_inputs("char_lstm_small", 50))) <= TOLERANCE


def _units_the_mask_leaves(network) -> list[int]:
    """Per weighted layer (per stacked LSTM layer), how many units the unit mask leaves possibly alive.

    An LSTM unit is only certainly dead when the mask drops it from both its input and recurrent
    weights (then its cell gate row is zero)."""
    mask, offset, tensors = network.get_mask(), 0, {}
    for name, bits in network.mask_layout():
        tensors[name] = mask[offset : offset + bits]
        offset += bits
    bounds = []
    for name, kept in tensors.items():
        if "weight_hh_l" in name:
            continue
        if "weight_ih_l" in name:
            kept = kept | tensors[name.replace("weight_ih", "weight_hh")]
        bounds.append(int(kept.sum()))
    return bounds
