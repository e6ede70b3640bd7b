"""``MaskedNetwork``: a flat sequence of named stages, with mask, score and weight I/O as flat vectors.

Masks, scores and probabilities travel as ONE flat vector over every masked tensor, in layer order
and C order within a tensor; ``mask_layout()`` says which slice belongs to which tensor. Tensors
are named ``f"{layer}.{tensor}"`` (``"conv1.weight"``, ``"lstm.weight_hh_l1"``), the same names the
frozen weights are derived from and that ``to_plain()``'s ``state_dict`` uses.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from fnmatch import fnmatchcase

import numpy as np
import torch
from torch import nn

from fedmask.models.layers import MaskConfig, MaskedLayer, WeightMode, WeightSpec

logger = logging.getLogger(__name__)


class MaskedNetwork(nn.Module):
    """Base of every zoo model: named stages run in order, masked layers among them.

    A masked layer's ``name`` must equal its stage name, so the name its weights are derived from
    is the name it has in the network. Stages run in the order given, which is also the order of
    ``layers()``, of the flat mask vector and of the weight digest.
    """

    def __init__(
        self,
        stages: Sequence[tuple[str, nn.Module]],
        *,
        seed: int,
        mask_config: MaskConfig | None = None,
        arch: str = "",
    ) -> None:
        super().__init__()
        self.seed = seed
        self.mask_config = mask_config or MaskConfig()
        self.arch = arch or type(self).__name__
        self.mode = WeightMode.MASK
        for name, module in stages:
            if isinstance(module, MaskedLayer):
                if module.name != name:
                    raise ValueError(f"{self.arch}: stage {name!r} holds a layer named {module.name!r}")
                if module.seed != seed or module.config != self.mask_config:
                    raise ValueError(f"{self.arch}: layer {name!r} was built with another seed or MaskConfig")
            self.add_module(name, module)
        names = [name for name, _ in self.layers()]
        for pattern in self.mask_config.masked_layers:
            if not any(fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"MaskConfig.masked_layers: pattern {pattern!r} matches no layer of {self.arch} "
                    f"(layers: {', '.join(names)})"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.children():
            x = stage(x)
        return x

    # ----- structure ---------------------------------------------------------------------------

    def layers(self) -> list[tuple[str, MaskedLayer]]:
        """The mask-capable layers in forward order."""
        return [(name, m) for name, m in self.named_children() if isinstance(m, MaskedLayer)]

    def _masked_tensors(self) -> Iterator[tuple[MaskedLayer, WeightSpec]]:
        for _, layer in self.layers():
            if layer.masked:
                for spec in layer.specs:
                    yield layer, spec

    def frozen_weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, frozen float32 array)`` for every weight tensor, in layer order (for the digest)."""
        for _, layer in self.layers():
            for spec in layer.specs:
                yield layer.key(spec.tensor), layer.frozen(spec.tensor).detach().cpu().numpy()

    @property
    def num_parameters(self) -> int:
        """Number of weights in the network (every layer, masked or not)."""
        return sum(spec.numel for _, layer in self.layers() for spec in layer.specs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer should train in the current mode; build it after ``set_mode``."""
        return [p for p in self.parameters() if p.requires_grad]

    # ----- modes -------------------------------------------------------------------------------

    def set_mode(self, mode: WeightMode | str) -> None:
        """Switch every layer to ``mode`` (see ``MaskedLayer.set_mode`` for the initial values)."""
        mode = WeightMode(mode)
        for _, layer in self.layers():
            layer.set_mode(mode)
        self.mode = mode

    def start_finetune(self) -> None:
        """Fix the current mask and make the kept weights trainable (MASK → FINETUNE)."""
        if self.mode is not WeightMode.MASK:
            raise RuntimeError(
                f"start_finetune: expected MASK mode, the network is in {self.mode.value} mode"
            )
        self.set_mode(WeightMode.FINETUNE)
        logger.debug("%s: fine-tuning %.4f of the weights", self.arch, self.density())

    def set_sampling_generator(self, generator: torch.Generator | None) -> None:
        """The generator sampled binarization draws from (``None``: torch's global generator)."""
        for _, layer in self.layers():
            layer.generator = generator

    # ----- masks and scores as flat vectors ------------------------------------------------------

    def mask_layout(self) -> list[tuple[str, int]]:
        """``(tensor name, number of mask bits)`` for every masked tensor, in flat-vector order."""
        return [
            (layer.key(spec.tensor), _numel(layer.score_shape(spec)))
            for layer, spec in self._masked_tensors()
        ]

    @property
    def num_mask_bits(self) -> int:
        return sum(bits for _, bits in self.mask_layout())

    def _flat(self, of: str) -> np.ndarray:
        parts = []
        for layer, spec in self._masked_tensors():
            scores = layer.scores[spec.tensor].detach()
            value = {"scores": scores, "probs": torch.sigmoid(scores), "mask": layer.score_mask(spec.tensor)}[
                of
            ]
            parts.append(value.cpu().numpy().reshape(-1))
        dtype = bool if of == "mask" else np.float32
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)

    def get_mask(self) -> np.ndarray:
        """The deterministic binary mask ``sigmoid(s) > 0.5`` of every masked tensor, flat, bool."""
        return self._flat("mask")

    def get_scores(self) -> np.ndarray:
        """The real-valued scores, flat, float32."""
        return self._flat("scores")

    def probabilities(self) -> np.ndarray:
        """``sigmoid(scores)``, flat, float32 (the keep probabilities FedPM exchanges)."""
        return self._flat("probs")

    def set_mask(self, mask: np.ndarray) -> None:
        """Set scores to ``±score_init`` so that ``get_mask()`` returns ``mask`` (flat, bool)."""
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"set_mask: expected a bool array, got dtype {mask.dtype}")
        self._check_flat("set_mask", mask)
        magnitude = np.float32(self.mask_config.score_init)
        self._load_scores(np.where(mask, magnitude, -magnitude).astype(np.float32))

    def set_scores(self, scores: np.ndarray) -> None:
        """Overwrite the scores from a flat float vector in ``mask_layout()`` order."""
        scores = np.asarray(scores)
        if not np.issubdtype(scores.dtype, np.floating):
            raise TypeError(f"set_scores: expected a float array, got dtype {scores.dtype}")
        self._check_flat("set_scores", scores)
        if not np.isfinite(scores).all():
            raise ValueError("set_scores: scores must be finite (found NaN or inf)")
        self._load_scores(scores.astype(np.float32, copy=False))

    def _check_flat(self, what: str, values: np.ndarray) -> None:
        if self.mode is WeightMode.FINETUNE:
            raise RuntimeError(f"{what}: the mask is fixed while fine-tuning")
        if values.shape != (self.num_mask_bits,):
            raise ValueError(
                f"{what}: expected a flat vector of {self.num_mask_bits} entries for {self.arch}, "
                f"got shape {values.shape}"
            )

    def _load_scores(self, flat: np.ndarray) -> None:
        offset = 0
        with torch.no_grad():
            for layer, spec in self._masked_tensors():
                scores = layer.scores[spec.tensor]
                chunk = flat[offset : offset + scores.numel()].reshape(scores.shape)
                scores.copy_(torch.from_numpy(chunk))
                offset += scores.numel()

    # ----- dense weights -----------------------------------------------------------------------

    def get_weights(self) -> dict[str, np.ndarray]:
        """The current mode's trainable tensors by tensor name (scores in MASK mode), as float32 copies."""
        return {
            layer.key(t): p.detach().cpu().numpy().copy()
            for _, layer in self.layers()
            for t, p in layer.trainable().items()
        }

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Overwrite the current mode's trainable tensors; keys and shapes must match ``get_weights()``."""
        targets = {
            layer.key(t): (layer, t, p) for _, layer in self.layers() for t, p in layer.trainable().items()
        }
        missing = sorted(set(targets) - set(weights))
        unexpected = sorted(set(weights) - set(targets))
        if missing or unexpected:
            raise ValueError(
                f"set_weights ({self.mode.value} mode): missing keys {missing or 'none'}, "
                f"unexpected keys {unexpected or 'none'}"
            )
        checked = {}
        for key, (_, _, param) in targets.items():
            value = np.asarray(weights[key])
            if not np.issubdtype(value.dtype, np.floating):
                raise TypeError(f"set_weights: {key}: expected a float array, got dtype {value.dtype}")
            if value.shape != tuple(param.shape):
                raise ValueError(
                    f"set_weights: {key}: expected shape {tuple(param.shape)}, got {value.shape}"
                )
            if not np.isfinite(value).all():
                raise ValueError(f"set_weights: {key}: values must be finite (found NaN or inf)")
            checked[key] = value
        for key, (layer, tensor, param) in targets.items():
            value = torch.from_numpy(checked[key].astype(np.float32, copy=False)).to(param.device)
            layer.load_trainable(tensor, value)

    # ----- density -----------------------------------------------------------------------------

    def layer_densities(self) -> dict[str, float]:
        """Fraction of each tensor's weights the current forward pass uses (1.0 in DENSE/BINARY)."""
        return {
            layer.key(spec.tensor): float(layer.full_mask(spec).mean())
            for _, layer in self.layers()
            for spec in layer.specs
        }

    def density(self) -> float:
        """Fraction of all weights the current forward pass uses (unmasked layers count as kept)."""
        kept = sum(float(layer.full_mask(spec).sum()) for _, layer in self.layers() for spec in layer.specs)
        return kept / self.num_parameters

    # ----- export ------------------------------------------------------------------------------

    def to_plain(self) -> nn.Sequential:
        """An ordinary torch model in eval mode whose weights are the effective forward weights.

        Masked layers become ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` (no bias), ``nn.Embedding`` or
        ``LastStepLSTM``; the other stages are copied. Stage names are kept, so the plain
        ``state_dict`` keys equal the tensor names here. Outputs equal this network's in eval mode.
        """
        plain = OrderedDict(
            (name, stage.to_plain() if isinstance(stage, MaskedLayer) else copy.deepcopy(stage))
            for name, stage in self.named_children()
        )
        return nn.Sequential(plain).eval()

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, seed={self.seed}, mode={self.mode.value}"


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))
