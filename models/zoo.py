"""The model zoo: ``build_model(arch, seed, num_classes, mask_config, **kw)`` and ``ARCHITECTURES``.

Every model is a ``MaskedNetwork`` of masked convolution/linear/embedding/LSTM layers, ReLU,
max-pooling and flatten stages, so ``to_plain()`` stays within the op set the TFLite exporter
supports. There are no normalization layers: batch norm carries learned and running statistics,
which would be more state to derive, mask, aggregate and transmit, and which a mask over frozen
weights cannot express; the signed-constant initialization keeps activations in range without them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedmask.models.layers import (
    MaskConfig,
    MaskedConv1d,
    MaskedConv2d,
    MaskedEmbedding,
    MaskedLayer,
    MaskedLinear,
    MaskedLSTM,
)
from fedmask.models.network import MaskedNetwork


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1 (the width multiplier of the CNNs)."""
    if not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    return max(1, round(channels * width))


class _Stages:
    """Collects ``(name, module)`` stages; masked layers get their name, seed and config from here."""

    def __init__(self, seed: int, config: MaskConfig | None) -> None:
        self.seed, self.config = seed, config or MaskConfig()
        self.items: list[tuple[str, nn.Module]] = []

    def masked(self, name: str, layer_type: type[MaskedLayer], *args: Any, **kwargs: Any) -> None:
        self.items.append((name, layer_type(*args, name=name, seed=self.seed, config=self.config, **kwargs)))

    def add(self, name: str, module: nn.Module) -> None:
        self.items.append((name, module))


class HarCNN(MaskedNetwork):
    """Accelerometer activity classifier: input float32 ``[B, 3, window]``, default window 128.

    conv(3→32, k5) ReLU maxpool4, conv(32→64, k5) ReLU maxpool4, fc 128, fc classes: ~78k weights at
    width 1 with 14 classes, small enough to train on a Raspberry Pi.
    """

    def __init__(
        self,
        seed: int,
        num_classes: int,
        mask_config: MaskConfig | None = None,
        width: float = 1.0,
        in_channels: int = 3,
        window: int = 128,
    ) -> None:
        c1, c2, hidden = scaled(32, width), scaled(64, width), scaled(128, width)
        steps = window // 4 // 4
        if steps < 1:
            raise ValueError(f"har_cnn: window must be at least 16 samples, got {window}")
        s = _Stages(seed, mask_config)
        s.masked("conv1", MaskedConv1d, in_channels, c1, 5, padding=2)
        s.add("relu1", nn.ReLU())
        s.add("pool1", nn.MaxPool1d(4))
        s.masked("conv2", MaskedConv1d, c1, c2, 5, padding=2)
        s.add("relu2", nn.ReLU())
        s.add("pool2", nn.MaxPool1d(4))
        s.add("flatten", nn.Flatten())
        s.masked("fc1", MaskedLinear, c2 * steps, hidden)
        s.add("relu3", nn.ReLU())
        s.masked("fc2", MaskedLinear, hidden, num_classes)
        super().__init__(s.items, seed=seed, mask_config=mask_config, arch="har_cnn")


class FemnistCNN(MaskedNetwork):
    """The LEAF FEMNIST CNN: input float32 ``[B, 1, 28, 28]``.

    conv5x5(32) ReLU maxpool2, conv5x5(64) ReLU maxpool2, fc 2048, fc classes (~6.6M weights at
    width 1; ``width=0.25`` gives a CPU-friendly ~0.4M).
    """

    def __init__(
        self, seed: int, num_classes: int, mask_config: MaskConfig | None = None, width: float = 1.0
    ) -> None:
        c1, c2, hidden = scaled(32, width), scaled(64, width), scaled(2048, width)
        s = _Stages(seed, mask_config)
        s.masked("conv1", MaskedConv2d, 1, c1, 5, padding=2)
        s.add("relu1", nn.ReLU())
        s.add("pool1", nn.MaxPool2d(2))
        s.masked("conv2", MaskedConv2d, c1, c2, 5, padding=2)
        s.add("relu2", nn.ReLU())
        s.add("pool2", nn.MaxPool2d(2))
        s.add("flatten", nn.Flatten())
        s.masked("fc1", MaskedLinear, c2 * 7 * 7, hidden)
        s.add("relu3", nn.ReLU())
        s.masked("fc2", MaskedLinear, hidden, num_classes)
        super().__init__(s.items, seed=seed, mask_config=mask_config, arch="femnist_cnn")


class ConvNet(MaskedNetwork):
    """Conv4/Conv6 of Zhou et al. and Ramanujan et al.: input float32 ``[B, 3, 32, 32]``.

    Blocks of two 3x3 convolutions then maxpool2: 64, 128 (and 256 for Conv6) channels; then fc
    256, fc 256, fc classes. ``width`` scales every channel and hidden size.
    """

    BLOCK_CHANNELS = (64, 128, 256)

    def __init__(
        self,
        seed: int,
        num_classes: int,
        mask_config: MaskConfig | None = None,
        depth: int = 4,
        width: float = 1.0,
    ) -> None:
        if depth not in (4, 6):
            raise ValueError(f"ConvNet: depth must be 4 or 6, got {depth}")
        s = _Stages(seed, mask_config)
        channels, size, index = 3, 32, 0
        for block in range(depth // 2):
            out = scaled(self.BLOCK_CHANNELS[block], width)
            for _ in range(2):
                index += 1
                s.masked(f"conv{index}", MaskedConv2d, channels, out, 3, padding=1)
                s.add(f"relu{index}", nn.ReLU())
                channels = out
            s.add(f"pool{block + 1}", nn.MaxPool2d(2))
            size //= 2
        s.add("flatten", nn.Flatten())
        hidden = scaled(256, width)
        s.masked("fc1", MaskedLinear, channels * size * size, hidden)
        s.add("relu_fc1", nn.ReLU())
        s.masked("fc2", MaskedLinear, hidden, hidden)
        s.add("relu_fc2", nn.ReLU())
        s.masked("fc3", MaskedLinear, hidden, num_classes)
        super().__init__(s.items, seed=seed, mask_config=mask_config, arch=f"conv{depth}")


class CharLSTM(MaskedNetwork):
    """LEAF Shakespeare next-character model: input int64 ``[B, T]`` character indices (T = 80).

    embedding 8, stacked LSTM (2 x 256), linear to the vocabulary (``num_classes``); predicts the
    character that follows the sequence.
    """

    def __init__(
        self,
        seed: int,
        num_classes: int,
        mask_config: MaskConfig | None = None,
        embedding_dim: int = 8,
        hidden_size: int = 256,
        num_layers: int = 2,
        arch: str = "char_lstm",
    ) -> None:
        s = _Stages(seed, mask_config)
        s.masked("embed", MaskedEmbedding, num_classes, embedding_dim)
        s.masked("lstm", MaskedLSTM, embedding_dim, hidden_size, num_layers)
        s.masked("fc", MaskedLinear, hidden_size, num_classes, gain=1.0)
        super().__init__(s.items, seed=seed, mask_config=mask_config, arch=arch)


def _conv4(seed: int, num_classes: int, mask_config: MaskConfig | None = None, width: float = 1.0) -> ConvNet:
    return ConvNet(seed, num_classes, mask_config, depth=4, width=width)


def _conv6(seed: int, num_classes: int, mask_config: MaskConfig | None = None, width: float = 1.0) -> ConvNet:
    return ConvNet(seed, num_classes, mask_config, depth=6, width=width)


def _char_lstm(
    seed: int,
    num_classes: int,
    mask_config: MaskConfig | None = None,
    embedding_dim: int = 8,
    hidden_size: int = 256,
    num_layers: int = 2,
) -> CharLSTM:
    return CharLSTM(seed, num_classes, mask_config, embedding_dim, hidden_size, num_layers)


def _char_lstm_small(
    seed: int,
    num_classes: int,
    mask_config: MaskConfig | None = None,
    embedding_dim: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> CharLSTM:
    return CharLSTM(
        seed, num_classes, mask_config, embedding_dim, hidden_size, num_layers, arch="char_lstm_small"
    )


@dataclass(frozen=True)
class Architecture:
    """A zoo entry: how to build it, what it is, and what one input example looks like."""

    build: Callable[..., MaskedNetwork]
    description: str
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    input_dtype: str  # "float32" features or "int64" token indices


ARCHITECTURES: dict[str, Architecture] = {
    "har_cnn": Architecture(
        HarCNN, "1-D CNN for 3-axis accelerometer windows (~78k weights)", (3, 128), "float32"
    ),
    "femnist_cnn": Architecture(
        FemnistCNN, "LEAF FEMNIST CNN for 28x28 grayscale images (width multiplier)", (1, 28, 28), "float32"
    ),
    "conv4": Architecture(
        _conv4, "Conv4 (Zhou et al.) for 32x32 RGB images (width multiplier)", (3, 32, 32), "float32"
    ),
    "conv6": Architecture(
        _conv6, "Conv6 (Zhou et al.) for 32x32 RGB images (width multiplier)", (3, 32, 32), "float32"
    ),
    "char_lstm": Architecture(
        _char_lstm, "LEAF Shakespeare next-character LSTM (embedding 8, 2x256)", (80,), "int64"
    ),
    "char_lstm_small": Architecture(
        _char_lstm_small, "Shakespeare next-character LSTM that trains fast on CPU (2x64)", (80,), "int64"
    ),
}


def build_model(
    arch: str, seed: int, num_classes: int, mask_config: MaskConfig | None = None, **kw: Any
) -> MaskedNetwork:
    """Build zoo model ``arch`` with frozen weights derived from ``seed``.

    Extra keywords go to the architecture: ``width`` for the CNNs (and ``window``, ``in_channels``
    for ``har_cnn``); ``embedding_dim``, ``hidden_size``, ``num_layers`` for the LSTMs.
    """
    entry = ARCHITECTURES.get(arch)
    if entry is None:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{arch}: seed must be an int, got {type(seed).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{arch}: num_classes must be an integer >= 2, got {num_classes!r}")
    try:
        inspect.signature(entry.build).bind(seed, num_classes, mask_config, **kw)
    except TypeError as exc:
        options = [n for n in inspect.signature(entry.build).parameters if n not in _COMMON_ARGS]
        raise TypeError(f"{arch}: {exc}; its options are {', '.join(options)}") from None
    return entry.build(seed, num_classes, mask_config, **kw)


_COMMON_ARGS = ("seed", "num_classes", "mask_config")
