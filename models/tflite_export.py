"""Export a plain PyTorch model (dense or compacted) to a ``.tflite`` file, without TensorFlow.

The model must be an ``nn.Sequential`` of the layers ``MaskedNetwork.to_plain()`` produces: Conv1d,
Conv2d, Linear, Embedding, a last-step LSTM block, ReLU, Tanh, max/average pooling (also adaptive),
Flatten, Dropout and Identity. Each layer becomes TFLite builtin operators:

============================  ==============================================================
PyTorch                       TFLite
============================  ==============================================================
Conv2d / Conv1d               CONV_2D (filters OHWI; Conv1d as a 1 x L image), PAD if needed
Linear                        FULLY_CONNECTED (weights ``[out, in]``, as in torch)
ReLU after Conv/Linear        fused into the operator (no separate op)
ReLU / Tanh elsewhere         RELU / TANH
MaxPool, AvgPool, Adaptive*   MAX_POOL_2D / AVERAGE_POOL_2D
Flatten                       RESHAPE (the next Linear's columns are permuted instead of a
                              runtime transpose back to channels-first order)
Embedding                     GATHER on the table
last-step LSTM                UNIDIRECTIONAL_SEQUENCE_LSTM per layer + GATHER of step T-1
softmax=True                  SOFTMAX on the output
============================  ==============================================================

Layout: the exported model takes **the same input as the PyTorch model** (``[B, C, H, W]``,
``[B, C, L]`` or int64 tokens ``[B, T]``), so the same arrays feed both. TFLite convolutions are
channels-last, so the graph starts with one TRANSPOSE to NHWC (a RESHAPE when there is a single
channel, as for grayscale images); everything after it stays channels-last. The transpose touches
each input value once, which is negligible next to the first convolution.

The batch dimension is dynamic (``shape_signature`` -1): resize the input to run a batch. The LSTM's
state tensors have a fixed batch of 1, so LSTM models run one sample per invocation.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import tflite
import torch
from torch import nn

from fedmask.models.compaction import lstm_layers, sequential_layers
from fedmask.models.tflite_builder import GraphBuilder, OptionsWriter, Quantization

logger = logging.getLogger(__name__)

Weights = Literal["float32", "int8"]
_Act = tflite.ActivationFunctionType
_Op = tflite.BuiltinOperator
_Opt = tflite.BuiltinOptions
_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_SKIPPED = (nn.Dropout, nn.Identity)


class ExportError(ValueError):
    """A model (or one of its layers) that cannot be expressed as TFLite builtin operators."""


def export_tflite(
    plain: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    softmax: bool = False,
    weights: Weights = "float32",
) -> bytes:
    """Convert `plain` to a TFLite flatbuffer; write it to `path` if given and return its bytes.

    `example_input` is one batch in the model's own layout (its batch size does not matter: the
    exported batch dimension is dynamic). With `softmax` the output is probabilities instead of
    logits. ``weights="int8"`` stores Conv/Linear weights as per-output-channel symmetric int8
    (dynamic-range quantization: activations stay float32, the runtime quantizes them on the fly).
    """
    if weights not in ("float32", "int8"):
        raise ExportError(f"weights: expected 'float32' or 'int8', got {weights!r}")
    layers = sequential_layers(plain)
    example = example_input[:1]
    was_training = plain.training
    plain.eval()
    try:
        with torch.no_grad():
            lowering = _Lowering(example, weights)
            x = example
            for index, layer in enumerate(layers):
                x = layer(x)
                lowering.lower(index, layer, tuple(x.shape), layers[index + 1 :])
            if softmax:
                lowering.softmax()
            data = lowering.finish()
    finally:
        plain.train(was_training)
    if path is not None:
        Path(path).write_bytes(data)
        logger.info("wrote %s (%d bytes)", path, len(data))
    return data


# -- options tables --------------------------------------------------------------------------------


def _conv_options(
    stride_h: int, stride_w: int, dil_h: int, dil_w: int, padding: int, act: int
) -> OptionsWriter:
    def write(b):
        tflite.Conv2DOptionsStart(b)
        tflite.Conv2DOptionsAddPadding(b, padding)
        tflite.Conv2DOptionsAddStrideH(b, stride_h)
        tflite.Conv2DOptionsAddStrideW(b, stride_w)
        tflite.Conv2DOptionsAddDilationHFactor(b, dil_h)
        tflite.Conv2DOptionsAddDilationWFactor(b, dil_w)
        tflite.Conv2DOptionsAddFusedActivationFunction(b, act)
        return tflite.Conv2DOptionsEnd(b)

    return write


def _pool_options(kernel: tuple[int, int], stride: tuple[int, int], padding: int, act: int) -> OptionsWriter:
    def write(b):
        tflite.Pool2DOptionsStart(b)
        tflite.Pool2DOptionsAddPadding(b, padding)
        tflite.Pool2DOptionsAddStrideH(b, stride[0])
        tflite.Pool2DOptionsAddStrideW(b, stride[1])
        tflite.Pool2DOptionsAddFilterHeight(b, kernel[0])
        tflite.Pool2DOptionsAddFilterWidth(b, kernel[1])
        tflite.Pool2DOptionsAddFusedActivationFunction(b, act)
        return tflite.Pool2DOptionsEnd(b)

    return write


def _fc_options(act: int, keep_num_dims: bool) -> OptionsWriter:
    def write(b):
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, act)
        tflite.FullyConnectedOptionsAddKeepNumDims(b, keep_num_dims)
        return tflite.FullyConnectedOptionsEnd(b)

    return write


def _reshape_options(shape: Sequence[int]) -> OptionsWriter:
    def write(b):
        b.StartVector(4, len(shape), 4)
        for d in reversed(shape):
            b.PrependInt32(int(d))
        vector = b.EndVector()
        tflite.ReshapeOptionsStart(b)
        tflite.ReshapeOptionsAddNewShape(b, vector)
        return tflite.ReshapeOptionsEnd(b)

    return write


def _gather_options(axis: int) -> OptionsWriter:
    def write(b):
        tflite.GatherOptionsStart(b)
        tflite.GatherOptionsAddAxis(b, axis)
        return tflite.GatherOptionsEnd(b)

    return write


def _lstm_options() -> OptionsWriter:
    def write(b):
        tflite.UnidirectionalSequenceLSTMOptionsStart(b)
        tflite.UnidirectionalSequenceLSTMOptionsAddFusedActivationFunction(b, _Act.TANH)
        tflite.UnidirectionalSequenceLSTMOptionsAddTimeMajor(b, False)
        return tflite.UnidirectionalSequenceLSTMOptionsEnd(b)

    return write


def _softmax_options() -> OptionsWriter:
    def write(b):
        tflite.SoftmaxOptionsStart(b)
        tflite.SoftmaxOptionsAddBeta(b, 1.0)
        return tflite.SoftmaxOptionsEnd(b)

    return write


def _empty_options(start, end) -> OptionsWriter:
    def write(b):
        start(b)
        return end(b)

    return write


# -- padding ---------------------------------------------------------------------------------------


def _tflite_padding(
    size: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    pad: Sequence[int],
    out: Sequence[int],
) -> int | None:
    """SAME or VALID if one reproduces torch's symmetric `pad` exactly for every spatial dim, else None."""

    def same(n: int, k: int, s: int, d: int, p: int, o: int) -> bool:
        span = (k - 1) * d + 1
        out_same = math.ceil(n / s)
        total = max((out_same - 1) * s + span - n, 0)
        return out_same == o and total // 2 == p

    def valid(n: int, k: int, s: int, d: int, p: int, o: int) -> bool:
        return p == 0 and (n - (k - 1) * d - 1) // s + 1 == o

    dims = list(zip(size, kernel, stride, dilation, pad, out))
    if all(valid(*dim) for dim in dims):
        return tflite.Padding.VALID
    if all(same(*dim) for dim in dims):
        return tflite.Padding.SAME
    return None


def _spatial(value, ndim: int) -> tuple[int, ...]:
    if isinstance(value, str):
        raise ExportError(f"string padding {value!r} is not supported; give explicit integers")
    return tuple(value) if isinstance(value, tuple | list) else (int(value),) * ndim


# -- int8 weights ----------------------------------------------------------------------------------


def _quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, Quantization]:
    """Symmetric int8 per output channel (axis 0): scale = max|w| / 127, zero point 0."""
    flat = weight.reshape(weight.shape[0], -1)
    scale = np.abs(flat).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero channel stays zero
    shape = (-1,) + (1,) * (weight.ndim - 1)
    q = np.clip(np.rint(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, Quantization(scale=scale, zero_point=np.zeros(len(scale), dtype=np.int64), axis=0)


# -- the lowering ----------------------------------------------------------------------------------


class _Lowering:
    """Walks the layers in order, keeping track of the current tensor and how its layout relates to
    PyTorch's: ``torch`` (same shape and order), ``nhwc`` (channels-last copy of ``[B, C, *spatial]``)
    or ``permuted`` (a flat ``[B, F]`` whose column j is torch's column ``perm[j]``)."""

    def __init__(self, example: torch.Tensor, weights: Weights) -> None:
        self.g = GraphBuilder()
        self.weights = weights
        dtype = _numpy_dtype(example.dtype)
        self.shape = tuple(example.shape)  # torch shape of the current activation, batch 1
        self.input = self.g.tensor("input", self.shape, dtype, dynamic_batch=True)
        self.x = self.input
        self.layout = "torch"
        self.perm: np.ndarray | None = None
        # (operator, options with a given fused activation) while that operator's activation is free
        self.fusable: tuple[int, Callable[[int], OptionsWriter]] | None = None
        self.count = 0

    # ---- helpers

    def _name(self, what: str) -> str:
        self.count += 1
        return f"{self.count:03d}_{what}"

    def _activation(self, shape: Sequence[int], what: str, dtype=np.float32) -> int:
        return self.g.tensor(self._name(what), shape, dtype, dynamic_batch=True)

    def _tflite_shape(self) -> tuple[int, ...]:
        if self.layout == "nhwc":
            b, c, *spatial = self.shape
            return (b, *([1] * (2 - len(spatial))), *spatial, c)
        return self.shape

    def _reshape(self, shape: Sequence[int], what: str) -> None:
        new_shape = (-1, *shape[1:])
        out = self._activation(shape, what)
        shape_const = self.g.constant(self._name(f"{what}_shape"), np.asarray(new_shape, dtype=np.int32))
        self.g.operator(
            _Op.RESHAPE, [self.x, shape_const], [out], _Opt.ReshapeOptions, _reshape_options(new_shape)
        )
        self.x, self.fusable = out, None

    def _transpose(self, perm: Sequence[int], shape: Sequence[int], what: str) -> None:
        out = self._activation(shape, what)
        perm_const = self.g.constant(self._name(f"{what}_perm"), np.asarray(perm, dtype=np.int32))
        self.g.operator(
            _Op.TRANSPOSE,
            [self.x, perm_const],
            [out],
            _Opt.TransposeOptions,
            _empty_options(tflite.TransposeOptionsStart, tflite.TransposeOptionsEnd),
        )
        self.x, self.fusable = out, None

    def to_nhwc(self) -> None:
        if self.layout == "nhwc":
            return
        self.to_torch()
        if len(self.shape) not in (3, 4):
            raise ExportError(f"expected a [B, C, L] or [B, C, H, W] activation, got shape {self.shape}")
        b, c, *spatial = self.shape
        hw = [1] * (2 - len(spatial)) + spatial
        if c == 1 or math.prod(hw) == 1:  # same memory order: a reshape is enough
            self._reshape((b, *hw, c), "to_nhwc")
        else:
            if len(spatial) == 1:
                self._reshape((b, c, *hw), "as_image")
            self._transpose((0, 2, 3, 1), (b, *hw, c), "to_nhwc")
        self.layout = "nhwc"

    def to_torch(self) -> None:
        if self.layout == "torch":
            return
        if self.layout == "permuted":
            assert self.perm is not None
            inverse = np.argsort(self.perm).astype(np.int32)
            out = self._activation(self.shape, "unpermute")
            idx = self.g.constant(self._name("unpermute_idx"), inverse)
            self.g.operator(_Op.GATHER, [self.x, idx], [out], _Opt.GatherOptions, _gather_options(1))
            self.x, self.perm, self.fusable = out, None, None
        else:
            b, c, *spatial = self.shape
            if c == 1 or math.prod(spatial) == 1:
                self._reshape(self.shape, "to_nchw")
            else:
                hw = [1] * (2 - len(spatial)) + spatial
                self._transpose((0, 3, 1, 2), (b, c, *hw), "to_nchw")
                if len(spatial) == 1:
                    self._reshape(self.shape, "to_ncl")
        self.layout = "torch"

    def _fuse_relu(self) -> bool:
        if self.fusable is None:
            return False
        op, rewrite = self.fusable
        self.g.replace_options(op, rewrite(_Act.RELU))
        self.fusable = None
        return True

    def _weights(self, name: str, weight: np.ndarray) -> int:
        if self.weights == "int8":
            q, quantization = _quantize_per_channel(weight)
            return self.g.constant(name, q, quantization)
        return self.g.constant(name, weight.astype(np.float32))

    # ---- layers

    def lower(self, index: int, layer: nn.Module, out_shape: tuple[int, ...], rest: list[nn.Module]) -> None:
        where = f"layer {index} ({type(layer).__name__})"
        try:
            self._lower(layer, out_shape, rest)
        except (ValueError, TypeError) as exc:  # ExportError, or a rejected LSTM/dtype
            raise ExportError(f"{where}: {exc}") from exc
        self.shape = out_shape

    def _lower(self, layer: nn.Module, out_shape: tuple[int, ...], rest: list[nn.Module]) -> None:
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            self._conv(layer, out_shape)
        elif isinstance(layer, nn.Linear):
            self._linear(layer, out_shape)
        elif isinstance(layer, nn.ReLU):
            if not self._fuse_relu():
                self._unary(_Op.RELU, "relu")
        elif isinstance(layer, nn.Tanh):
            self._unary(_Op.TANH, "tanh")
        elif isinstance(layer, _POOLS):
            self._pool(layer, out_shape)
        elif isinstance(layer, nn.Flatten):
            self._flatten(layer, out_shape, rest)
        elif isinstance(layer, nn.Embedding):
            self._embedding(layer, out_shape)
        elif isinstance(layer, _SKIPPED):
            pass
        elif (stack := lstm_layers(layer)) is not None:
            self._lstm(stack, out_shape)
        else:
            raise ExportError("no TFLite lowering for this layer type")

    def _unary(self, op: int, what: str) -> None:
        out = self._activation(self._tflite_shape(), what)
        self.g.operator(op, [self.x], [out])
        self.x, self.fusable = out, None

    def _conv(self, conv: nn.Conv1d | nn.Conv2d, out_shape: tuple[int, ...]) -> None:
        if conv.groups != 1:
            raise ExportError(f"grouped convolution (groups={conv.groups}) is not supported")
        if conv.padding_mode != "zeros":
            raise ExportError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        self.to_nhwc()
        nd = conv.weight.dim() - 2
        kernel, stride = _spatial(conv.kernel_size, nd), _spatial(conv.stride, nd)
        dilation, pad = _spatial(conv.dilation, nd), _spatial(conv.padding, nd)
        size, out_size = self.shape[2:], out_shape[2:]
        if nd == 1:  # a 1 x L image: prepend the unit height
            kernel, stride, dilation, pad = (1, *kernel), (1, *stride), (1, *dilation), (0, *pad)
            size, out_size = (1, *size), (1, *out_size)
        padding = _tflite_padding(size, kernel, stride, dilation, pad, out_size)
        if padding is None:  # explicit zero padding, then VALID
            self._pad(pad)
            padding = tflite.Padding.VALID
        w = conv.weight.detach().cpu().numpy()
        w = w[:, :, None, :] if nd == 1 else w  # [O, I, 1, L]
        filters = self._weights(self._name("conv_filters"), w.transpose(0, 2, 3, 1))  # OHWI
        bias = self._bias(conv.bias, w.shape[0], "conv_bias")
        out = self._activation((out_shape[0], *out_size, out_shape[1]), "conv")
        options = _conv_options(stride[0], stride[1], dilation[0], dilation[1], padding, _Act.NONE)
        op = self.g.operator(_Op.CONV_2D, [self.x, filters, bias], [out], _Opt.Conv2DOptions, options)

        def rewrite(act: int) -> OptionsWriter:
            return _conv_options(stride[0], stride[1], dilation[0], dilation[1], padding, act)

        self.x, self.fusable = out, (op, rewrite)

    def _pad(self, pad: Sequence[int], value: float | None = None) -> None:
        """Pad H and W symmetrically (``pad`` = (h, w)) with zeros, or with `value` (PADV2)."""
        b, h, w, c = self._tflite_shape()
        widths = np.array([[0, 0], [pad[0], pad[0]], [pad[1], pad[1]], [0, 0]], dtype=np.int32)
        out = self._activation((b, h + 2 * pad[0], w + 2 * pad[1], c), "pad")
        paddings = self.g.constant(self._name("pad_widths"), widths)
        if value is None:
            options = _empty_options(tflite.PadOptionsStart, tflite.PadOptionsEnd)
            self.g.operator(_Op.PAD, [self.x, paddings], [out], _Opt.PadOptions, options)
        else:
            fill = self.g.constant(self._name("pad_value"), np.asarray(value, dtype=np.float32))
            options = _empty_options(tflite.PadV2OptionsStart, tflite.PadV2OptionsEnd)
            self.g.operator(_Op.PADV2, [self.x, paddings, fill], [out], _Opt.PadV2Options, options)
        self.x, self.fusable = out, None

    def _bias(self, bias: torch.Tensor | None, n: int, what: str) -> int:
        # CONV_2D and FULLY_CONNECTED are fastest with an explicit bias; zeros cost n floats.
        values = np.zeros(n, np.float32) if bias is None else bias.detach().cpu().numpy().astype(np.float32)
        return self.g.constant(self._name(what), values)

    def _linear(self, linear: nn.Linear, out_shape: tuple[int, ...]) -> None:
        w = linear.weight.detach().cpu().numpy()
        if self.layout == "permuted":
            w = w[:, self.perm]  # read features in the order the channels-last flatten produced
        elif self.layout == "nhwc":
            self.to_torch()
        weights = self._weights(self._name("fc_weights"), w)
        bias = self._bias(linear.bias, w.shape[0], "fc_bias")
        keep_dims = len(out_shape) > 2
        out = self._activation(out_shape, "fc")
        op = self.g.operator(
            _Op.FULLY_CONNECTED,
            [self.x, weights, bias],
            [out],
            _Opt.FullyConnectedOptions,
            _fc_options(_Act.NONE, keep_dims),
        )
        self.x, self.layout, self.perm = out, "torch", None
        self.fusable = (op, lambda act: _fc_options(act, keep_dims))

    def _pool(self, pool: nn.Module, out_shape: tuple[int, ...]) -> None:
        self.to_nhwc()
        nd = len(self.shape) - 2
        size, out_size = tuple(self.shape[2:]), tuple(out_shape[2:])
        is_max = isinstance(pool, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d))
        if isinstance(
            pool, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
        ):
            if any(n % o for n, o in zip(size, out_size)):
                raise ExportError(
                    f"adaptive pooling from {size} to {out_size} needs sizes that divide evenly"
                )
            kernel = stride = tuple(n // o for n, o in zip(size, out_size))
            pad, dilation = (0,) * nd, (1,) * nd
        else:
            kernel, stride = _spatial(pool.kernel_size, nd), _spatial(pool.stride or pool.kernel_size, nd)
            pad, dilation = _spatial(pool.padding, nd), _spatial(getattr(pool, "dilation", 1), nd)
            if any(d != 1 for d in dilation):
                raise ExportError("dilated pooling is not supported")
        if nd == 1:
            kernel, stride, dilation, pad = (1, *kernel), (1, *stride), (1, *dilation), (0, *pad)
            size, out_size = (1, *size), (1, *out_size)
        # TFLite's SAME average pooling leaves padding out of the count, torch's default counts it.
        counts_padding = not is_max and any(pad) and getattr(pool, "count_include_pad", False)
        padding = None if counts_padding else _tflite_padding(size, kernel, stride, dilation, pad, out_size)
        if padding is None:
            padded = tuple(n + 2 * p for n, p in zip(size, pad))
            no_pad = (0,) * len(pad)
            valid = (
                _tflite_padding(padded, kernel, stride, dilation, no_pad, out_size) == tflite.Padding.VALID
            )
            if not valid or not (is_max or counts_padding):
                raise ExportError(
                    f"padding {pad[-nd:]} (ceil_mode={getattr(pool, 'ceil_mode', False)}, "
                    f"count_include_pad={getattr(pool, 'count_include_pad', None)}) has no TFLite equivalent"
                )
            # explicit padding, then VALID: zeros are counted like torch's average pooling counts
            # them, and the lowest float never wins a max (torch pads max pooling with -inf)
            self._pad(pad, float(np.finfo(np.float32).min) if is_max else None)
            padding = tflite.Padding.VALID
        out = self._activation((out_shape[0], *out_size, out_shape[1]), "pool")
        op = _Op.MAX_POOL_2D if is_max else _Op.AVERAGE_POOL_2D
        options = _pool_options(kernel, stride, padding, _Act.NONE)
        index = self.g.operator(op, [self.x], [out], _Opt.Pool2DOptions, options)
        # ReLU commutes with max pooling, so a ReLU after the pool can still be fused into it.
        self.x = out
        self.fusable = (index, lambda act: _pool_options(kernel, stride, padding, act)) if is_max else None

    def _flatten(self, flatten: nn.Flatten, out_shape: tuple[int, ...], rest: list[nn.Module]) -> None:
        if flatten.start_dim != 1 or flatten.end_dim != -1:
            raise ExportError("only Flatten(start_dim=1, end_dim=-1) is supported")
        if len(self.shape) == 2:
            return
        if self.layout == "nhwc":
            _, c, *spatial = self.shape
            next_weighted = next((m for m in rest if not isinstance(m, (nn.ReLU, nn.Tanh, *_SKIPPED))), None)
            if c == 1 or math.prod(spatial) == 1:
                self._reshape(out_shape, "flatten")
                self.layout = "torch"
            elif isinstance(next_weighted, nn.Linear):
                # channels-last order (h, w, c); the Linear reads its columns in that order
                self._reshape(out_shape, "flatten")
                self.layout = "permuted"
                torch_index = np.arange(out_shape[1]).reshape(c, *spatial)
                self.perm = np.moveaxis(torch_index, 0, -1).reshape(-1)
            else:
                self.to_torch()
                self._reshape(out_shape, "flatten")
        else:
            self.to_torch()
            self._reshape(out_shape, "flatten")

    def _embedding(self, embedding: nn.Embedding, out_shape: tuple[int, ...]) -> None:
        if self.g.dtype_of(self.x) not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise ExportError("an Embedding needs integer token ids as its input")
        if embedding.max_norm is not None:
            raise ExportError("Embedding(max_norm=...) renormalizes at run time and is not supported")
        table = self.g.constant(self._name("embedding_table"), embedding.weight.detach().cpu().numpy())
        out = self._activation(out_shape, "embedding")
        self.g.operator(_Op.GATHER, [table, self.x], [out], _Opt.GatherOptions, _gather_options(0))
        self.x, self.layout, self.fusable = out, "torch", None

    def _lstm(self, stack: list[nn.LSTM], out_shape: tuple[int, ...]) -> None:
        self.to_torch()
        if len(self.shape) != 3:
            raise ExportError(f"an LSTM needs a [B, T, features] input, got {self.shape}")
        b, t, _ = self.shape
        for k, lstm in enumerate(stack):
            self._lstm_layer(lstm, k, (b, t))
        last = self.g.constant(self._name("last_step"), np.asarray(t - 1, dtype=np.int32))
        out = self._activation(out_shape, "lstm_last_step")
        self.g.operator(_Op.GATHER, [self.x, last], [out], _Opt.GatherOptions, _gather_options(1))
        self.x, self.fusable = out, None

    def _lstm_layer(self, lstm: nn.LSTM, k: int, batch_time: tuple[int, int]) -> None:
        h = lstm.hidden_size
        w_ih = lstm.weight_ih_l0.detach().cpu().numpy().reshape(4, h, -1)  # gates i, f, g, o
        w_hh = lstm.weight_hh_l0.detach().cpu().numpy().reshape(4, h, h)
        bias = np.zeros((4, h), np.float32)
        if lstm.bias:
            bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().cpu().numpy().reshape(4, h)
        gates = ("input", "forget", "cell", "output")
        ih = [self.g.constant(self._name(f"lstm{k}_input_to_{n}"), w_ih[i]) for i, n in enumerate(gates)]
        hh = [self.g.constant(self._name(f"lstm{k}_recurrent_to_{n}"), w_hh[i]) for i, n in enumerate(gates)]
        biases = [self.g.constant(self._name(f"lstm{k}_{n}_bias"), bias[i]) for i, n in enumerate(gates)]
        b, t = batch_time
        # Batch-sized state: a runtime that runs a batch resizes these with the input (see module doc).
        output_state = self._state(f"lstm{k}_output_state", (b, h))
        cell_state = self._state(f"lstm{k}_cell_state", (b, h))
        out = self._activation((b, t, h), f"lstm{k}")
        no_peephole, no_projection, no_layer_norm = [-1] * 3, [-1] * 2, [-1] * 4
        inputs = [
            self.x,
            *ih,
            *hh,
            *no_peephole,
            *biases,
            *no_projection,
            output_state,
            cell_state,
            *no_layer_norm,
        ]
        self.g.operator(
            _Op.UNIDIRECTIONAL_SEQUENCE_LSTM,
            inputs,
            [out],
            _Opt.UnidirectionalSequenceLSTMOptions,
            _lstm_options(),
        )
        self.x = out

    def _state(self, what: str, shape: tuple[int, int]) -> int:
        return self.g.tensor(self._name(what), shape, is_variable=True, dynamic_batch=True)

    def softmax(self) -> None:
        self.to_torch()
        out = self._activation(self.shape, "softmax")
        self.g.operator(_Op.SOFTMAX, [self.x], [out], _Opt.SoftmaxOptions, _softmax_options())
        self.x, self.fusable = out, None

    def finish(self) -> bytes:
        self.to_torch()
        description = "fedmask export: input and output in the PyTorch model's layout"
        return self.g.finish([self.input], [self.x], description)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    table = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}
    if dtype not in table:
        raise ExportError(f"example_input dtype {dtype} is not supported (float32, int64 or int32)")
    return np.dtype(table[dtype])
