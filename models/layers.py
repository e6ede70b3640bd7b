"""Masked layers: one frozen random weight per tensor, four ways to train on top of it.

Every layer derives its frozen weights from ``(seed, f"{name}.{tensor}")`` (see ``models.weights``)
and runs in one ``WeightMode``:

* ``MASK``: trainable real-valued scores ``s``; forward weight ``W * m`` with
  ``m = 1[sigmoid(s) > 0.5]`` (or Bernoulli(sigmoid(s)) in training when sampled), straight-through
  backward ``dL/ds = dL/dm * sigmoid'(s)``.
* ``DENSE``: a trainable ``W`` initialised by ``kaiming_uniform(seed, name)``.
* ``FINETUNE``: a trainable ``W`` initialised to ``W_frozen * m`` for the mask at the switch; the
  forward uses ``W * m``, so pruned weights stay exactly zero and get zero gradient.
* ``BINARY``: latent real weights clipped to ``[-1, 1]``; forward ``sign(W) * gain / sqrt(fan_in)``,
  straight-through backward (zero outside ``[-1, 1]``), for BNN-FedAvg.

No layer has a bias: a bias would be one more tensor to derive, mask and transmit, and the
masked random networks this project builds on work without them.

Trainable parameters are created when the mode changes, so build the optimizer after
``set_mode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmask.models.weights import kaiming_uniform, signed_constant

RELU_GAIN = math.sqrt(2.0)


class WeightMode(str, Enum):
    """What a layer trains and how its forward weight is formed."""

    MASK = "mask"
    DENSE = "dense"
    FINETUNE = "finetune"
    BINARY = "binary"


@dataclass(frozen=True)
class MaskConfig:
    """How masks are shaped, binarized and which layers get one.

    ``score_init`` defaults to 1.0: ``sigmoid(1) ≈ 0.73 > 0.5`` so the deterministic mask starts all
    ones, i.e. training starts from the full random network (which already carries signal, and the
    first feature layers should stay dense); ``sigmoid'(1) ≈ 0.20`` keeps ~80% of the largest
    straight-through gradient, so a mask bit can still flip within a few steps. ``set_mask`` writes
    ``±score_init``, so it must be positive.
    """

    granularity: Literal["weight", "unit"] = "weight"
    binarization: Literal["deterministic", "sampled"] = "deterministic"
    masked_layers: tuple[str, ...] = ("*",)
    score_init: float = 1.0

    def __post_init__(self) -> None:
        if self.granularity not in ("weight", "unit"):
            raise ValueError(f"MaskConfig.granularity: expected 'weight' or 'unit', got {self.granularity!r}")
        if self.binarization not in ("deterministic", "sampled"):
            raise ValueError(
                f"MaskConfig.binarization: expected 'deterministic' or 'sampled', got {self.binarization!r}"
            )
        if isinstance(self.masked_layers, str) or not all(isinstance(p, str) for p in self.masked_layers):
            raise ValueError(
                f"MaskConfig.masked_layers: expected a tuple of fnmatch patterns, got {self.masked_layers!r}"
            )
        object.__setattr__(self, "masked_layers", tuple(self.masked_layers))
        if not (math.isfinite(self.score_init) and self.score_init > 0):
            raise ValueError(f"MaskConfig.score_init: expected a finite value > 0, got {self.score_init!r}")

    def masks(self, layer_name: str) -> bool:
        """Whether the layer called ``layer_name`` is masked (matches one of ``masked_layers``)."""
        return any(fnmatchcase(layer_name, pattern) for pattern in self.masked_layers)


class ThresholdSTE(torch.autograd.Function):
    """``m = 1[sigmoid(s) > 0.5]``; backward ``dL/ds = dL/dm * sigmoid'(s)``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(scores)
        ctx.save_for_backward(probs)
        return (probs > 0.5).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        return grad_mask * probs * (1.0 - probs)


class BernoulliSTE(torch.autograd.Function):
    """``m ~ Bernoulli(sigmoid(s))`` drawn from ``generator``; backward as ``ThresholdSTE``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        probs = torch.sigmoid(scores)
        ctx.save_for_backward(probs)
        return torch.bernoulli(probs, generator=generator)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        (probs,) = ctx.saved_tensors
        return grad_mask * probs * (1.0 - probs), None


class SignSTE(torch.autograd.Function):
    """``sign(w)`` with ``sign(0) = +1``; backward passes the gradient where ``|w| <= 1``."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(latent)
        return torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (latent,) = ctx.saved_tensors
        return grad * (latent.abs() <= 1.0).to(grad.dtype)


@dataclass(frozen=True)
class WeightSpec:
    """One weight tensor of a layer: its name, shape, fan-in and which axis holds the output units.

    ``unit_repeat`` > 1 means the unit axis holds that many blocks of units (the four LSTM gates);
    one unit score then covers the unit's rows in every block.
    """

    tensor: str
    shape: tuple[int, ...]
    fan_in: int
    unit_axis: int = 0
    unit_repeat: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_units(self) -> int:
        return self.shape[self.unit_axis] // self.unit_repeat


def _frozen_attr(tensor: str) -> str:
    return f"frozen_{tensor}"


def _fixed_mask_attr(tensor: str) -> str:
    return f"fixed_mask_{tensor}"


class MaskedLayer(nn.Module):
    """Base of the masked layers: frozen weights, scores, mode switching and weight formation.

    Subclasses declare their ``WeightSpec``s, implement ``forward`` with ``self.weight(tensor)`` and
    ``to_plain`` with ``self.effective_weights()``.
    """

    def __init__(
        self,
        specs: list[WeightSpec],
        *,
        name: str,
        seed: int,
        config: MaskConfig | None,
        gain: float,
    ) -> None:
        super().__init__()
        if not name:
            raise ValueError(f"{type(self).__name__}: name must be the layer's qualified name, got ''")
        self.name = name
        self.seed = seed
        self.config = config or MaskConfig()
        self.gain = gain
        self.specs = tuple(specs)
        self.masked = self.config.masks(name)
        self.mode = WeightMode.MASK
        self.generator: torch.Generator | None = None
        self.scores = nn.ParameterDict()
        self.weights = nn.ParameterDict()
        for spec in self.specs:
            frozen = signed_constant(seed, self.key(spec.tensor), spec.shape, spec.fan_in, gain)
            # Not persistent: anyone can re-derive them, and a checkpoint should not carry them.
            self.register_buffer(_frozen_attr(spec.tensor), torch.from_numpy(frozen), persistent=False)
            if self.masked:
                self.scores[spec.tensor] = nn.Parameter(
                    torch.full(self.score_shape(spec), float(self.config.score_init))
                )

    # ----- naming and shapes -------------------------------------------------------------------

    def key(self, tensor: str) -> str:
        """The network-wide name of one of this layer's tensors: ``f"{name}.{tensor}"``."""
        return f"{self.name}.{tensor}"

    def score_shape(self, spec: WeightSpec) -> tuple[int, ...]:
        return spec.shape if self.config.granularity == "weight" else (spec.num_units,)

    def frozen(self, tensor: str) -> torch.Tensor:
        return getattr(self, _frozen_attr(tensor))

    def _expand_units(self, mask: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
        """A score-shaped mask made broadcastable against the weight (identity for per-weight masks)."""
        if self.config.granularity == "weight":
            return mask
        if spec.unit_repeat > 1:
            mask = mask.repeat(spec.unit_repeat)
        view = [1] * len(spec.shape)
        view[spec.unit_axis] = -1
        return mask.view(view)

    # ----- masks -------------------------------------------------------------------------------

    def score_mask(self, tensor: str) -> torch.Tensor:
        """The deterministic mask of ``tensor`` in score shape (bool): ``sigmoid(s) > 0.5``."""
        return torch.sigmoid(self.scores[tensor].detach()) > 0.5

    def _score_mask_full(self, spec: WeightSpec) -> torch.Tensor:
        """The deterministic score mask at full weight shape (float 0/1; all ones if unmasked)."""
        frozen = self.frozen(spec.tensor)
        if not self.masked:
            return torch.ones_like(frozen)
        mask = self._expand_units(self.score_mask(spec.tensor), spec)
        return mask.expand(spec.shape).to(frozen.dtype).contiguous()

    def full_mask(self, spec: WeightSpec) -> torch.Tensor:
        """The mask the current mode applies to ``spec``'s weight, at full weight shape (float 0/1).

        MASK: the deterministic score mask; FINETUNE: the mask fixed at the switch; DENSE and
        BINARY use every weight.
        """
        if self.mode is WeightMode.FINETUNE:
            return getattr(self, _fixed_mask_attr(spec.tensor)).clone()
        if self.mode is WeightMode.MASK:
            return self._score_mask_full(spec)
        return torch.ones_like(self.frozen(spec.tensor))

    def _forward_mask(self, spec: WeightSpec, sample: bool) -> torch.Tensor:
        scores = self.scores[spec.tensor]
        mask = BernoulliSTE.apply(scores, self.generator) if sample else ThresholdSTE.apply(scores)
        return self._expand_units(mask, spec)

    # ----- weights -----------------------------------------------------------------------------

    def weight(self, tensor: str) -> torch.Tensor:
        """The weight the forward pass uses for ``tensor`` in the current mode (differentiable)."""
        spec = next(s for s in self.specs if s.tensor == tensor)
        sample = self.training and self.config.binarization == "sampled"
        return self._weight(spec, sample)

    def _weight(self, spec: WeightSpec, sample: bool) -> torch.Tensor:
        t = spec.tensor
        if self.mode is WeightMode.MASK:
            frozen = self.frozen(t)
            return frozen * self._forward_mask(spec, sample) if self.masked else frozen
        if self.mode is WeightMode.DENSE:
            return self.weights[t]
        if self.mode is WeightMode.FINETUNE:
            return self.weights[t] * getattr(self, _fixed_mask_attr(t))
        latent = self.weights[t]
        if bool((latent.detach().abs() > 1.0).any()):
            # BinaryConnect clips the latent weights after each update; doing it lazily here keeps
            # the rule independent of the optimizer and is a no-op while they are in range.
            with torch.no_grad():
                latent.clamp_(-1.0, 1.0)
        return SignSTE.apply(latent) * self.binary_scale(spec)

    def binary_scale(self, spec: WeightSpec) -> float:
        return float(np.float32(self.gain / math.sqrt(spec.fan_in)))

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """Detached eval-mode forward weights per tensor (deterministic mask, no sampling)."""
        with torch.no_grad():
            return {spec.tensor: self._weight(spec, sample=False).detach().clone() for spec in self.specs}

    def trainable(self) -> dict[str, nn.Parameter]:
        """The tensors the current mode trains, by tensor name (scores in MASK mode, else weights)."""
        source = self.scores if self.mode is WeightMode.MASK else self.weights
        return dict(source.items())

    def load_trainable(self, tensor: str, value: torch.Tensor) -> None:
        """Overwrite one trainable tensor; FINETUNE keeps pruned weights zero, BINARY clips to [-1, 1]."""
        target = self.trainable()[tensor]
        with torch.no_grad():
            target.copy_(value)
            if self.mode is WeightMode.FINETUNE:
                target.mul_(getattr(self, _fixed_mask_attr(tensor)))
            elif self.mode is WeightMode.BINARY:
                target.clamp_(-1.0, 1.0)

    # ----- modes -------------------------------------------------------------------------------

    def set_mode(self, mode: WeightMode | str) -> None:
        """Switch mode; the new mode's trainable tensor starts from its defined initial value.

        DENSE starts from ``kaiming_uniform(seed, key)``, BINARY from the same values clipped to
        ``[-1, 1]``, FINETUNE from ``W_frozen * m`` for the current deterministic mask (all ones for
        an unmasked layer). Scores are kept across switches and train only in MASK mode. Setting
        the current mode again changes nothing.
        """
        mode = WeightMode(mode)
        if mode is self.mode:
            return
        self._drop_trainable()
        for spec in self.specs:
            t = spec.tensor
            frozen = self.frozen(t)
            if mode is WeightMode.FINETUNE:
                mask = self._score_mask_full(spec)
                self.register_buffer(_fixed_mask_attr(t), mask)
                self.weights[t] = nn.Parameter(frozen * mask)
            elif mode in (WeightMode.DENSE, WeightMode.BINARY):
                init = kaiming_uniform(self.seed, self.key(t), spec.shape, spec.fan_in, self.gain)
                if mode is WeightMode.BINARY:
                    init = np.clip(init, -1.0, 1.0)
                self.weights[t] = nn.Parameter(torch.from_numpy(init).to(frozen.device))
        for scores in self.scores.values():
            scores.requires_grad_(mode is WeightMode.MASK)
        self.mode = mode

    def _drop_trainable(self) -> None:
        self.weights = nn.ParameterDict()
        for spec in self.specs:
            if _fixed_mask_attr(spec.tensor) in self._buffers:
                delattr(self, _fixed_mask_attr(spec.tensor))

    def to_plain(self) -> nn.Module:  # pragma: no cover - every concrete layer overrides it
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, mode={self.mode.value}, masked={self.masked}"


def _copy_into(parameter: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(value)


class MaskedLinear(MaskedLayer):
    """``y = x W^T`` with ``W`` of shape ``[out_features, in_features]``; units are output neurons."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        name: str,
        seed: int,
        config: MaskConfig | None = None,
        gain: float = RELU_GAIN,
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        spec = WeightSpec("weight", (out_features, in_features), fan_in=in_features)
        super().__init__([spec], name=name, seed=seed, config=config, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight("weight"))

    def to_plain(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=False)
        _copy_into(plain.weight, self.effective_weights()["weight"])
        return plain


class MaskedConv1d(MaskedLayer):
    """1-D convolution, weight ``[out, in, kernel]``; units are output channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        name: str,
        seed: int,
        config: MaskConfig | None = None,
        gain: float = RELU_GAIN,
    ) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        spec = WeightSpec(
            "weight", (out_channels, in_channels, kernel_size), fan_in=in_channels * kernel_size
        )
        super().__init__([spec], name=name, seed=seed, config=config, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight("weight"), None, self.stride, self.padding)

    def to_plain(self) -> nn.Conv1d:
        plain = nn.Conv1d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, bias=False
        )
        _copy_into(plain.weight, self.effective_weights()["weight"])
        return plain


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class MaskedConv2d(MaskedLayer):
    """2-D convolution, weight ``[out, in, kh, kw]``; units are output channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        *,
        name: str,
        seed: int,
        config: MaskConfig | None = None,
        gain: float = RELU_GAIN,
    ) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        kh, kw = self.kernel_size
        spec = WeightSpec("weight", (out_channels, in_channels, kh, kw), fan_in=in_channels * kh * kw)
        super().__init__([spec], name=name, seed=seed, config=config, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight("weight"), None, self.stride, self.padding)

    def to_plain(self) -> nn.Conv2d:
        plain = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, bias=False
        )
        _copy_into(plain.weight, self.effective_weights()["weight"])
        return plain


class MaskedEmbedding(MaskedLayer):
    """Lookup table ``[num_embeddings, embedding_dim]``; units are embedding dimensions (columns).

    ``fan_in`` is 1 (a one-hot input) and the default gain 1, so entries are ``±1``: unit variance,
    like ``nn.Embedding``'s N(0, 1) initialization.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        name: str,
        seed: int,
        config: MaskConfig | None = None,
        gain: float = 1.0,
    ) -> None:
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        spec = WeightSpec("weight", (num_embeddings, embedding_dim), fan_in=1, unit_axis=1)
        super().__init__([spec], name=name, seed=seed, config=config, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight("weight"))

    def to_plain(self) -> nn.Embedding:
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim)
        _copy_into(plain.weight, self.effective_weights()["weight"])
        return plain


class LastStepLSTM(nn.Module):
    """A plain ``nn.LSTM`` (no biases) that returns the last layer's output at the last time step.

    This is what ``MaskedLSTM.to_plain()`` returns and what the TFLite exporter understands.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, bias=False, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(x)
        return output[:, -1] if self.batch_first else output[-1]


class MaskedLSTM(MaskedLayer):
    """A stacked LSTM without biases whose ``weight_ih_l{k}`` and ``weight_hh_l{k}`` are masked.

    Input ``[B, T, input_size]`` (``[T, B, input_size]`` if not ``batch_first``), zero initial
    state; returns the last layer's output at the last time step, ``[B, hidden_size]`` (a sequence
    encoder, as the next-character models need). Gate order and math are ``nn.LSTM``'s; the
    forward runs ``torch.lstm`` on the masked weights. Units are hidden units: one unit score
    covers that unit's row in all four gates, so a pruned unit's output is exactly zero.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        *,
        name: str,
        seed: int,
        config: MaskConfig | None = None,
        gain: float = 1.0,
    ) -> None:
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.batch_first = num_layers, batch_first
        specs: list[WeightSpec] = []
        for k in range(num_layers):
            layer_input = input_size if k == 0 else hidden_size
            specs.append(WeightSpec(f"weight_ih_l{k}", (4 * hidden_size, layer_input), layer_input, 0, 4))
            specs.append(WeightSpec(f"weight_hh_l{k}", (4 * hidden_size, hidden_size), hidden_size, 0, 4))
        super().__init__(specs, name=name, seed=seed, config=config, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"{self.name}: expected a 3-D input sequence, got shape {tuple(x.shape)}")
        batch = x.shape[0] if self.batch_first else x.shape[1]
        zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
        weights = [self.weight(spec.tensor) for spec in self.specs]
        output, _, _ = torch.lstm(
            x, (zeros, zeros), weights, False, self.num_layers, 0.0, self.training, False, self.batch_first
        )
        return output[:, -1] if self.batch_first else output[-1]

    def to_plain(self) -> LastStepLSTM:
        plain = LastStepLSTM(self.input_size, self.hidden_size, self.num_layers, self.batch_first)
        for tensor, value in self.effective_weights().items():
            _copy_into(getattr(plain.lstm, tensor), value)
        return plain
