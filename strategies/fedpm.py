"""FedPM (Isik et al., ICLR 2023, "Sparse Random Networks for Communication-Efficient FL").

Like FedMask, devices train scores over the frozen random weights, but FedPM learns one *global*
probability mask: masks are Bernoulli-sampled in training (``MaskConfig.binarization="sampled"``), every
round starts from the global probabilities (``scores = logit(p)``), and after local training a device
uploads one mask sampled from its updated probabilities (``bits``).

The server estimates the keep probability of each weight with a Beta posterior (the paper's Bayesian
aggregation): ``alpha += sum of masks``, ``beta += sum of (1 - mask)``, ``p = (alpha - 1) /
(alpha + beta - 2)`` (the posterior mode), with ``alpha = beta = prior`` reset every ``reset_every``
rounds so that old masks do not freeze the estimate. With the flat prior 1 and a reset every round,
``p`` is exactly the mean of the masks. The paper resets every 1/(participation rate) rounds; the
server half cannot see the fleet size, so whoever configures the run sets ``reset_every`` (the
comparison benchmark does).

Round 1 starts from ``p = sigmoid(score_init)`` everywhere, the network FedMask starts from. (The
paper draws scores around 0, p ~ 1/2, over weights scaled up by e; our frozen weights are scaled for a
dense start, and keeping about half of them at random would shrink the signal at every layer.)

Probabilities go down as ``f16``: within 2**-11 of float32 in [0, 1], which moves ``logit(p)`` far less
than one Adam step on the scores. A device clips ``p`` to [``prob_clip``, 1 - ``prob_clip``] before
taking the logit, so a weight every device kept can still be dropped by local training.

FedPM is global, not personalized: evaluation uses the global probabilities (deterministic mask
``p > 1/2``), which is what the comparison needs to show what personalization buys.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fedmask.models import WeightMode
from fedmask.protocol.tensor_codec import Coded
from fedmask.strategies.base import (
    Body,
    ClientHalf,
    ClientUpdate,
    DecodedBody,
    Evaluation,
    FinalModel,
    FitResult,
    ServerHalf,
    Strategy,
    TaskSpec,
)
from fedmask.strategies.model_factory import build_for
from fedmask.strategies.training import derive_seed, evaluate, train_epochs

DEFAULTS = {
    "lr": 0.1,  # Adam on scores, as FedPM (and FedMask) train them
    "prior": 1.0,  # Beta(prior, prior); 1 is flat, so the posterior mode is the mean of masks
    "reset_every": 1,
    "prob_clip": 0.01,
}
# ``init_prob`` (round 1's keep probability) has no default: sigmoid(MaskConfig.score_init), the network
# FedMask starts from.


def _hyper(spec: TaskSpec, key: str):
    return spec.hyper.get(key, DEFAULTS.get(key, spec.h(key)))


def sampled_spec(spec: TaskSpec) -> TaskSpec:
    """The task with Bernoulli-sampled binarization, whatever the run's mask config says."""
    return dataclasses.replace(spec, mask_config={**spec.mask_config, "binarization": "sampled"})


def logit(p: np.ndarray, clip: float) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[clip, 1 - clip]``, float32."""
    q = np.clip(np.asarray(p, dtype=np.float64), clip, 1.0 - clip)
    return np.log(q / (1.0 - q)).astype(np.float32)


class BetaPosterior:
    """Per-weight Beta(alpha, beta) over the keep probability, fed with binary masks."""

    def __init__(self, size: int, prior: float) -> None:
        if not prior >= 1.0:
            raise ValueError(f"fedpm: prior must be >= 1 (a Beta prior with a mode), got {prior}")
        self.prior = float(prior)
        self.alpha = np.full(size, self.prior)
        self.beta = np.full(size, self.prior)

    def reset(self) -> None:
        self.alpha.fill(self.prior)
        self.beta.fill(self.prior)

    def observe(self, mask: np.ndarray, weight: float = 1.0) -> None:
        kept = np.asarray(mask, dtype=bool)
        self.alpha += weight * kept
        self.beta += weight * ~kept

    def mode(self) -> np.ndarray:
        """The posterior mode ``(alpha - 1) / (alpha + beta - 2)`` (1/2 where nothing was observed)."""
        denominator = self.alpha + self.beta - 2.0
        safe = np.where(denominator > 0, denominator, 1.0)
        return np.where(denominator > 0, (self.alpha - 1.0) / safe, 0.5)


class FedPMServer(ServerHalf):
    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.num_bits = build_for(sampled_spec(spec), WeightMode.MASK).num_mask_bits
        self.posterior = BetaPosterior(self.num_bits, float(_hyper(spec, "prior")))
        self.reset_every = int(_hyper(spec, "reset_every"))
        if self.reset_every < 1:
            raise ValueError(f"fedpm: reset_every must be >= 1 round, got {self.reset_every}")
        self.rounds_since_reset = 0

    def initial_body(self) -> Body | None:
        return None  # every device starts from the same initial probabilities (init_prob)

    def expected_update(self) -> dict[str, tuple[int, ...]]:
        return {"mask": (self.num_bits,)}

    def aggregate(self, updates: list[ClientUpdate], round_no: int) -> Body:
        if self.rounds_since_reset >= self.reset_every:
            self.posterior.reset()
            self.rounds_since_reset = 0
        for update in updates:
            self.posterior.observe(update.body["mask"], update.weight)
        self.rounds_since_reset += 1
        return {"probs": Coded(self.posterior.mode().astype(np.float32), "f16")}


class FedPMClient(ClientHalf):
    """Stateless between rounds: each round starts from the global probabilities."""

    def __init__(self, spec: TaskSpec, data) -> None:
        super().__init__(spec, data)
        self.model = build_for(sampled_spec(spec), WeightMode.MASK)
        self.device_seed = derive_seed(spec.seed, data.device_id)
        self.clip = float(_hyper(spec, "prob_clip"))
        if not 0.0 < self.clip < 0.5:
            raise ValueError(f"fedpm: prob_clip must be in (0, 0.5), got {self.clip}")
        init_prob = spec.hyper.get("init_prob")
        if init_prob is None:
            init_prob = 1.0 / (1.0 + np.exp(-self.model.mask_config.score_init))
        self._start_from(np.full(self.model.num_mask_bits, float(init_prob)))

    def _start_from(self, probs: np.ndarray) -> None:
        self.model.set_scores(logit(probs, self.clip))

    def _load(self, global_body: DecodedBody | None) -> None:
        if global_body:
            self._start_from(global_body["probs"])

    def fit(self, global_body: DecodedBody | None, round_no: int) -> FitResult:
        self._load(global_body)
        self.model.set_sampling_generator(
            torch.Generator().manual_seed(derive_seed(self.device_seed, round_no, "sampling"))
        )
        optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=float(_hyper(self.spec, "lr")))
        metrics = train_epochs(
            self.model,
            self.data.x_train,
            self.data.y_train,
            epochs=int(self.spec.h("local_epochs")),
            batch_size=int(self.spec.h("batch_size")),
            optimizer=optimizer,
            seed=derive_seed(self.device_seed, round_no),
        )
        rng = np.random.default_rng(derive_seed(self.device_seed, round_no, "upload"))
        probs = self.model.probabilities()
        mask = rng.random(probs.shape) < probs
        metrics["density"] = float(mask.mean()) if mask.size else 1.0
        return FitResult(
            body={"mask": Coded(mask, "bits")}, num_samples=len(self.data.y_train), metrics=metrics
        )

    def evaluate(self, global_body: DecodedBody | None) -> Evaluation:
        self._load(global_body)
        return evaluate(self.model, self.data.x_test, self.data.y_test)

    def finalize(self, global_body: DecodedBody | None) -> FinalModel:
        self._load(global_body)
        result = evaluate(self.model, self.data.x_test, self.data.y_test)
        mask = self.model.get_mask()
        return FinalModel(
            model=self.model, evaluation=result, mask=mask, metrics={"density": float(mask.mean())}
        )


class FedPM(Strategy):
    name = "fedpm"
    description = "FedPM: one global probability mask from Bernoulli-sampled device masks (not personalized)"
    defaults = DEFAULTS

    def server(self, spec: TaskSpec) -> ServerHalf:
        return FedPMServer(spec)

    def client(self, spec: TaskSpec, data) -> ClientHalf:
        return FedPMClient(spec, data)
