"""What a simulation run is: data, partition, fleet size, schedule, strategies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MAX_PAYLOAD = 128 * 1024


@dataclass
class SimulationConfig:
    dataset: str = "hmp"
    partition: str | None = None  # None: the workload's natural/default partition
    devices: int | None = None  # None: the workload's default fleet size
    devices_per_round: int | None = None  # None: every device every round
    rounds: int = 10
    local_epochs: int = 1
    strategies: list[str] = field(default_factory=lambda: ["fedmask"])
    seed: int = 0
    output_dir: Path = Path("runs/latest")
    data_root: Path | None = None
    arch: str | None = None  # None: the workload's default architecture
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    hyper: dict[str, dict[str, Any]] = field(default_factory=dict)  # strategy name -> overrides
    mask_config: dict[str, Any] = field(default_factory=dict)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 1
    max_payload: int = DEFAULT_MAX_PAYLOAD
    transport: str = "inproc"
    # Mask codings the simulated parties decode: "bits" alone is the version-1 coding; with "mctx"
    # masks travel coded against the bases both sides hold (protocol.mask_coding).
    mask_codings: list[str] = field(default_factory=lambda: ["bits", "mctx"])
    fleet: str = "sim"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["data_root"] = str(self.data_root) if self.data_root else None
        return d
