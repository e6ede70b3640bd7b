"""LG-FedAvg (Liang et al. 2020, "Think Locally, Act Globally"): local representations, global head.

Each device trains the whole dense network, but only the *global* layers (by default the last two
mask-capable layers, i.e. the classifier head) travel and are averaged by the server; the
representation layers below never leave the device and stay personal. Weights of the global layers
travel as float32 both ways; the local layers are the device's state.

The split is the hyperparameter ``global_layers``: an int N (the last N layers of ``model.layers()``)
or a list of layer names / fnmatch patterns (``["fc*"]``). The paper also starts from a FedAvg-trained
model; here every method starts from the same seed-derived initialization instead, so that all
methods get the same budget.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from fedmask.models import MaskedNetwork, WeightMode
from fedmask.strategies.base import (
    ClientHalf,
    DecodedBody,
    FitResult,
    ServerHalf,
    Strategy,
    TaskSpec,
)
from fedmask.strategies.fedavg import DEFAULTS as FEDAVG_DEFAULTS
from fedmask.strategies.fedavg import FedAvgServer, sgd, weights_body
from fedmask.strategies.model_client import ModelClient
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import derive_seed

# The optimizer is FedAvg's (SGD with momentum).
DEFAULTS = {"lr": FEDAVG_DEFAULTS["lr"], "momentum": FEDAVG_DEFAULTS["momentum"], "global_layers": 2}


def _hyper(spec: TaskSpec, key: str):
    return spec.hyper.get(key, DEFAULTS.get(key, spec.h(key)))


def global_layer_names(model: MaskedNetwork, split: int | list[str] | tuple[str, ...]) -> list[str]:
    """The layers whose weights are shared, in forward order, for a ``global_layers`` setting."""
    names = [name for name, _ in model.layers()]
    if isinstance(split, bool) or not isinstance(split, (int, list, tuple)):
        raise ValueError(f"lgfedavg: global_layers must be an int or a list of layer names, got {split!r}")
    if isinstance(split, int):
        if not 1 <= split <= len(names):
            raise ValueError(
                f"lgfedavg: global_layers={split} must be between 1 and {len(names)} "
                f"(the layers of {model.arch}: {', '.join(names)})"
            )
        return names[len(names) - split :]
    unmatched = [p for p in split if not any(fnmatchcase(n, str(p)) for n in names)]
    if unmatched or not split:
        raise ValueError(
            f"lgfedavg: global_layers {list(split)!r} must name layers of {model.arch} "
            f"({', '.join(names)}); no match for {unmatched}"
        )
    return [n for n in names if any(fnmatchcase(n, str(p)) for p in split)]


def global_tensor_names(model: MaskedNetwork, split) -> list[str]:
    """The weight tensors (``"fc1.weight"``, ...) that belong to the global layers."""
    chosen = set(global_layer_names(model, split))
    return [layer.key(t) for name, layer in model.layers() if name in chosen for t in layer.trainable()]


def _split(spec: TaskSpec) -> int | list[str]:
    split = _hyper(spec, "global_layers")
    return list(split) if isinstance(split, tuple) else split


class LgFedAvgServer(FedAvgServer):
    """FedAvg's sample- and staleness-weighted mean, over the global layers only."""

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        shared = global_tensor_names(build_for(spec, WeightMode.DENSE), _split(spec))
        self.shapes = {name: self.shapes[name] for name in shared}


class LgFedAvgClient(ModelClient):
    """The whole network lives here; only the global layers are replaced by the server's average."""

    def __init__(self, spec: TaskSpec, data) -> None:
        super().__init__(spec, data)
        self.model = build_for(spec, WeightMode.DENSE)
        self.global_names = global_tensor_names(self.model, _split(spec))
        self.device_seed = derive_seed(spec.seed, data.device_id)

    def receive(self, global_body: DecodedBody | None) -> None:
        if global_body:
            weights = self.model.get_weights()
            weights.update({name: global_body[name] for name in self.global_names})
            self.model.set_weights(weights)

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        self.receive(global_body)
        metrics = self.train(
            sgd(self.model, self.spec, _hyper(self.spec, "lr")),
            epochs=int(self.spec.h("local_epochs")),
            seed=derive_seed(self.device_seed, round_no),
        )
        weights = self.model.get_weights()
        return FitResult(
            body=weights_body({name: weights[name] for name in self.global_names}),
            num_samples=len(self.data.y_train),
            metrics=metrics,
        )


class LgFedAvg(Strategy):
    name = "lgfedavg"
    description = "LG-FedAvg: representation layers stay on the device, the head is averaged"
    defaults = DEFAULTS

    def server(self, spec: TaskSpec) -> ServerHalf:
        return LgFedAvgServer(spec)

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return LgFedAvgClient(spec, data)
