"""Masked layers over frozen random weights, the network base class, the model zoo and the sparsity loss."""

from fedmask.models.layers import (
    LastStepLSTM,
    MaskConfig,
    MaskedConv1d,
    MaskedConv2d,
    MaskedEmbedding,
    MaskedLayer,
    MaskedLinear,
    MaskedLSTM,
    WeightMode,
)
from fedmask.models.network import MaskedNetwork
from fedmask.models.sparsity import layer_lambdas, sparsity_loss
from fedmask.models.weights import kaiming_uniform, signed_constant, weights_digest
from fedmask.models.zoo import ARCHITECTURES, Architecture, build_model

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "LastStepLSTM",
    "MaskConfig",
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedEmbedding",
    "MaskedLSTM",
    "MaskedLayer",
    "MaskedLinear",
    "MaskedNetwork",
    "WeightMode",
    "build_model",
    "kaiming_uniform",
    "layer_lambdas",
    "signed_constant",
    "sparsity_loss",
    "weights_digest",
]
