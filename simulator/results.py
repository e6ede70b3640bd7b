"""What a run measured, per round and per device, and the summary numbers results.json reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RoundRecord:
    round: int
    participants: list[str]
    uplink_bytes: int  # sum over this round's updates, as encoded on the wire
    downlink_bytes: int  # the round announcement times the devices that fetched it
    accuracy_mean: float | None = None  # sample-weighted personalized test accuracy, if evaluated
    train_loss: float | None = None
    density: float | None = None  # mean mask density (mask strategies)
    wall_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (train, encode, ...)
    # Per update / per fetched announcement, on the wire (bytes * 8 / parameters of an update), and the
    # conditional-entropy estimate of the masks they carried (given the bases they were coded against;
    # None when no masks travelled in that direction).
    uplink_bits_per_param: float | None = None
    downlink_bits_per_param: float | None = None
    uplink_entropy_bits_per_param: float | None = None
    downlink_entropy_bits_per_param: float | None = None

    def set_mask_bits(
        self, params: int, *, up_params: int, up_entropy: float, down_params: int, down_entropy: float
    ) -> None:
        """Fill the per-round bits/param figures from this round's bytes and entropy estimates."""
        n = len(self.participants)
        if params and n:
            self.uplink_bits_per_param = self.uplink_bytes * 8 / n / params
            self.downlink_bits_per_param = self.downlink_bytes * 8 / n / params
        if up_params:
            self.uplink_entropy_bits_per_param = up_entropy / up_params
        if down_params:
            self.downlink_entropy_bits_per_param = down_entropy / down_params


@dataclass
class DeviceResult:
    device_id: str
    accuracy: float
    num_test: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class MethodResult:
    strategy: str
    params_per_update: int  # parameters an update describes (masked params for masks, weights otherwise)
    rounds: list[RoundRecord] = field(default_factory=list)
    devices: list[DeviceResult] = field(default_factory=list)
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uplink_bytes_total(self) -> int:
        return sum(r.uplink_bytes for r in self.rounds)

    @property
    def downlink_bytes_total(self) -> int:
        return sum(r.downlink_bytes for r in self.rounds)

    @property
    def num_updates(self) -> int:
        return sum(len(r.participants) for r in self.rounds)

    def accuracy_mean(self) -> float:
        weights = np.array([d.num_test for d in self.devices], dtype=np.float64)
        accs = np.array([d.accuracy for d in self.devices], dtype=np.float64)
        return float((accs * weights).sum() / weights.sum()) if weights.sum() else 0.0

    def accuracy_p10(self) -> float:
        accs = [d.accuracy for d in self.devices]
        return float(np.percentile(accs, 10)) if accs else 0.0

    def uplink_bits_per_param(self) -> float:
        """Mean encoded bits per parameter per update (i.e. per device per round)."""
        if not self.num_updates or not self.params_per_update:
            return 0.0
        return self.uplink_bytes_total * 8 / self.num_updates / self.params_per_update

    def downlink_bits_per_param(self) -> float:
        fetched = sum(len(r.participants) for r in self.rounds)
        if not fetched or not self.params_per_update:
            return 0.0
        return self.downlink_bytes_total * 8 / fetched / self.params_per_update

    def summary(self) -> dict[str, Any]:
        return {
            "accuracy_mean": self.accuracy_mean(),
            "accuracy_p10": self.accuracy_p10(),
            "uplink_bits_per_param": self.uplink_bits_per_param(),
            "downlink_bits_per_param": self.downlink_bits_per_param(),
            "uplink_bytes_total": self.uplink_bytes_total,
            "downlink_bytes_total": self.downlink_bytes_total,
            "params_per_update": self.params_per_update,
            "wall_s": self.wall_s,
            "rounds": [asdict(r) for r in self.rounds],
            "devices": [asdict(d) for d in self.devices],
            **self.extra,
        }
