"""Multiply-accumulate (MAC) counts of a zoo model, from its layer shapes.

One forward pass of a single example is traced to learn each layer's output size; then per layer:

- linear ``[out, in]``: ``out * in`` (times the sequence length if applied per step);
- conv1d/conv2d: ``weight.numel() * output positions`` (output length, or height * width);
- LSTM: ``T * sum(weight.numel())`` over its input and recurrent matrices (all four gates);
- embedding: 0 (a lookup).

Training one example costs the forward pass plus a backward pass of about twice that (one product for
the gradient with respect to the input, one for the weights), so ``3 * forward``; the mask, sign and
clip operations of the masked modes are element-wise and left out. A FLOP estimate is ``2 * MACs``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmask.models import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedEmbedding,
    MaskedLinear,
    MaskedLSTM,
    MaskedNetwork,
)

BACKWARD_FACTOR = 2  # backward ~ two forward-sized products: input gradient and weight gradient


def layer_forward_macs(
    model: MaskedNetwork, input_shape: tuple[int, ...], input_dtype: str
) -> dict[str, int]:
    """Forward MACs of one example, per mask-capable layer (in forward order)."""
    outputs: dict[str, tuple[int, ...]] = {}
    handles = [
        layer.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, tuple(out.shape))
        )
        for name, layer in model.layers()
    ]
    try:
        example = torch.zeros(
            (1, *input_shape), dtype=torch.int64 if input_dtype == "int64" else torch.float32
        )
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    sequence = input_shape[0] if input_dtype == "int64" else 1
    macs: dict[str, int] = {}
    for name, layer in model.layers():
        numel = sum(spec.numel for spec in layer.specs)
        out = outputs[name]
        if isinstance(layer, MaskedEmbedding):
            macs[name] = 0
        elif isinstance(layer, MaskedLSTM):
            macs[name] = sequence * numel
        elif isinstance(layer, (MaskedConv1d, MaskedConv2d)):
            macs[name] = numel * math.prod(out[2:])
        elif isinstance(layer, MaskedLinear):
            macs[name] = numel * math.prod(out[1:-1])  # 1 for [1, out]; T for [1, T, out]
        else:
            raise TypeError(f"flops: no MAC rule for layer {name!r} of type {type(layer).__name__}")
    return macs


def train_macs_per_example(model: MaskedNetwork, input_shape: tuple[int, ...], input_dtype: str) -> int:
    """MACs of one training example: forward plus a backward of ``BACKWARD_FACTOR`` forwards."""
    forward = sum(layer_forward_macs(model, input_shape, input_dtype).values())
    return (1 + BACKWARD_FACTOR) * forward


def dtype_name(dtype: np.dtype | str) -> str:
    return "int64" if np.dtype(dtype) == np.int64 else "float32"
