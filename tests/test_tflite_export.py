"""TFLite export: the file follows the schema, and the real interpreter reproduces PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import tflite
import torch
from torch import nn

from fedmask.device_agent.inference import TFLiteModel
from fedmask.models.compaction import compact
from fedmask.models.layers import MaskConfig
from fedmask.models.tflite_builder import BUFFER_ALIGNMENT
from fedmask.models.tflite_export import ExportError, export_tflite
from fedmask.models.zoo import build_model

TOLERANCE = 1e-4


def _torch_out(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _tflite_out(data: bytes, x: np.ndarray) -> np.ndarray:
    return TFLiteModel(data).predict(x)


def _operators(data: bytes) -> list[str]:
    model = tflite.Model.GetRootAs(data, 0)
    names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    codes = [model.OperatorCodes(i).BuiltinCode() for i in range(model.OperatorCodesLength())]
    graph = model.Subgraphs(0)
    return [names[codes[graph.Operators(i).OpcodeIndex()]] for i in range(graph.OperatorsLength())]


def test_file_follows_the_schema(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    path = tmp_path / "m.tflite"
    data = export_tflite(model, torch.randn(2, 5), path)
    assert path.read_bytes() == data
    assert data[4:8] == b"TFL3"
    parsed = tflite.Model.GetRootAs(data, 0)
    assert parsed.Version() == 3
    assert parsed.Buffers(0).DataLength() == 0  # the empty sentinel
    graph = parsed.Subgraphs(0)
    weights = []
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        if tensor.Buffer() > 0 and parsed.Buffers(tensor.Buffer()).DataLength() > 0:
            buffer = parsed.Buffers(tensor.Buffer())
            offset = buffer.DataAsNumpy().ctypes.data - np.frombuffer(data, np.uint8).ctypes.data
            assert offset % BUFFER_ALIGNMENT == 0, tensor.Name()
            weights.append(buffer.DataAsNumpy().view(np.float32))
    expected = {model[0].weight, model[0].bias, model[2].weight, model[2].bias}
    for param in expected:
        assert any(np.array_equal(w, param.detach().numpy().ravel()) for w in weights)
    assert _operators(data) == ["FULLY_CONNECTED", "FULLY_CONNECTED"]  # the ReLU is fused


# Each case: (name, model, input shape); together they cover every lowering path.
def _cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return [
        (
            "conv2d_same_valid_pad_stride_bias",
            nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),  # SAME
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, stride=2, padding=1),  # torch pads 1 on both sides: explicit PAD
                nn.Tanh(),
                nn.Conv2d(8, 4, 2, dilation=2),  # VALID, dilated
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 5 * 5, 6),
            ),
            (3, 14, 14),
        ),
        (
            "conv1d_channels_pool_flatten_permutation",
            nn.Sequential(
                nn.Conv1d(3, 6, 5, padding=2, bias=False),
                nn.ReLU(),
                nn.MaxPool1d(4),
                nn.Conv1d(6, 5, 3, stride=2, bias=False),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(5 * 15, 4, bias=False),
            ),
            (3, 128),
        ),
        (
            "pools_adaptive_avg_dropout",
            nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.MaxPool2d(3, stride=2, padding=1),
                nn.ReLU(),
                nn.AvgPool2d(3, stride=1, padding=1),  # counts the zero padding, as torch does
                nn.AvgPool2d(2),
                nn.Conv2d(4, 6, 1),
                nn.AdaptiveAvgPool2d(1),
                nn.Dropout(0.3),
                nn.Flatten(),
                nn.Linear(6, 3),
            ),
            (1, 16, 16),
        ),
        (
            "conv_output_without_flatten",
            nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, ceil_mode=True),  # = SAME: the extra window sees -inf padding
                nn.AdaptiveMaxPool2d(2),
            ),
            (2, 8, 8),
        ),
        (
            "mlp_on_images",
            nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 4)),
            (2, 6, 6),
        ),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_every_lowering_matches_pytorch(case) -> None:
    _, model, shape = case
    model.eval()
    x = np.random.default_rng(0).standard_normal((20, *shape)).astype(np.float32)
    data = export_tflite(model, torch.from_numpy(x[:1]))
    np.testing.assert_allclose(_tflite_out(data, x), _torch_out(model, x), atol=TOLERANCE, rtol=0)


def test_channels_last_conversion_is_one_transpose_or_a_reshape() -> None:
    rgb = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    assert _operators(export_tflite(rgb, torch.zeros(1, 3, 8, 8))) == [
        "TRANSPOSE",
        "CONV_2D",
        "RESHAPE",
        "FULLY_CONNECTED",
    ]
    assert _operators(export_tflite(gray, torch.zeros(1, 1, 8, 8)))[0] == "RESHAPE"


def test_softmax_output_option() -> None:
    model = nn.Sequential(nn.Linear(4, 6)).eval()
    x = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    probs = _tflite_out(export_tflite(model, torch.from_numpy(x), softmax=True), x)
    expected = torch.softmax(torch.from_numpy(_torch_out(model, x)), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_unsupported_layers_are_named() -> None:
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)).eval()
    with pytest.raises(ExportError, match=r"layer 0 \(Conv2d\): grouped convolution"):
        export_tflite(grouped, torch.zeros(1, 4, 8, 8))
    norm = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).eval()
    with pytest.raises(ExportError, match=r"layer 1 \(LayerNorm\)"):
        export_tflite(norm, torch.zeros(1, 3))
    ceil_pool = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)).eval()
    with pytest.raises(ExportError, match=r"ceil_mode=True.*no TFLite equivalent"):
        export_tflite(ceil_pool, torch.zeros(1, 1, 6, 6))
    with pytest.raises(ExportError, match="weights"):
        export_tflite(grouped, torch.zeros(1, 4, 8, 8), weights="int4")  # type: ignore[arg-type]


# -- every zoo model, dense and compacted, on 100 real inputs ------------------------------------

ZOO = [
    ("har_cnn", {}, 14),
    ("femnist_cnn", {"width": 0.25}, 62),
    ("conv4", {"width": 0.5}, 10),
    ("conv6", {"width": 0.25}, 10),
    ("char_lstm_small", {}, 81),
    pytest.param("char_lstm", {}, 81, marks=pytest.mark.slow),  # 2 x 256 LSTM: torch's reference is slow
]


def _masked_plain(arch: str, kwargs: dict, classes: int) -> nn.Sequential:
    """Unit-level random mask (whole units dropped, so compaction has work) on the zoo model."""
    network = build_model(arch, 7, classes, MaskConfig(granularity="unit"), **kwargs)
    network.set_mask(np.random.default_rng(7).random(network.num_mask_bits) < 0.6)
    return network.to_plain()


@pytest.mark.parametrize(("arch", "kwargs", "classes"), ZOO)
def test_zoo_models_dense_and_compacted_match_pytorch(
    arch: str, kwargs: dict, classes: int, real_inputs
) -> None:
    x = real_inputs(arch, 100)
    dense = _masked_plain(arch, kwargs, classes)
    compacted = compact(dense)
    reference = _torch_out(dense, x)
    assert np.abs(reference).max() > 1e-2  # the comparison is not between two near-zero outputs
    for name, model in (("dense", dense), ("compacted", compacted)):
        data = export_tflite(model, torch.from_numpy(x[:1]))
        got = _tflite_out(data, x)
        assert got.shape == (100, classes)
        np.testing.assert_allclose(got, reference, atol=TOLERANCE, rtol=0, err_msg=f"{arch} {name}")
    assert len(export_tflite(compacted, torch.from_numpy(x[:1]))) < len(
        export_tflite(dense, torch.from_numpy(x[:1]))
    )


def test_int8_weights_are_smaller_and_close(real_inputs) -> None:
    x = real_inputs("femnist_cnn", 100)
    plain = _masked_plain("femnist_cnn", {"width": 0.25}, 62)
    float_model = export_tflite(plain, torch.from_numpy(x[:1]))
    int8_model = export_tflite(plain, torch.from_numpy(x[:1]), weights="int8")
    assert len(int8_model) < 0.3 * len(float_model)
    reference = _torch_out(plain, x)
    got = _tflite_out(int8_model, x)
    # dynamic-range quantization is approximate: the predicted classes should mostly agree
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert np.abs(got - reference).max() < 0.1 * np.abs(reference).max()
