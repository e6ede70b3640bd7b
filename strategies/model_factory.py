"""Builds a task's network on any party: same spec, same seed, bit-identical frozen weights."""

from __future__ import annotations

from fedmask.models import MaskConfig, MaskedNetwork, WeightMode, build_model
from fedmask.strategies.base import TaskSpec


def mask_config(spec: TaskSpec) -> MaskConfig:
    return MaskConfig(**spec.mask_config)


def build_for(spec: TaskSpec, mode: WeightMode) -> MaskedNetwork:
    """The task's architecture in the given parameterization (see docs/architecture.md)."""
    model = build_model(
        spec.arch,
        seed=spec.seed,
        num_classes=spec.num_classes,
        mask_config=mask_config(spec),
        **spec.arch_kwargs,
    )
    model.set_mode(mode)
    return model
