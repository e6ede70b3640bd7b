"""What a report shows about one task, whatever ran it: per-round and per-device rows and a summary.

Two sources fill it: a stored task (``from_history``: the SQL store of a deployment or of a simulation
over MQTT) and a simulation's results document (``from_results``: the in-process transport keeps no
store). The plots and the Markdown/HTML pages are drawn from this one shape only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RoundStats:
    round: int
    participants: int  # accepted updates
    quorum: int | None = None
    late: int = 0  # accepted updates trained from an older round (staleness >= 1)
    missing: int | None = None  # devices of the task that sent nothing this round (None: unknown)
    uplink_bytes: int = 0
    downlink_bytes: int | None = None
    accuracy: float | None = None  # sample-weighted test accuracy the participants reported
    loss: float | None = None
    density: float | None = None
    uplink_bits_per_param: float | None = None  # per update; known to the simulator only
    rejections: int = 0
    state: str = "closed"
    closed_by: str | None = None
    duration_s: float | None = None


@dataclass
class DeviceStats:
    device_id: str
    accuracy: float
    num_test: int | None = None
    density: float | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None


@dataclass
class TaskReport:
    name: str  # the task id, or the strategy's name in a simulation without a store
    source: str  # "store" or "simulation"
    strategy: str
    fleet: str | None = None
    arch: str | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    devices: list[DeviceStats] = field(default_factory=list)
    rejections_by_reason: dict[str, int] = field(default_factory=dict)
    downlink_note: str = ""  # how downlink bytes were counted

    def summary(self) -> dict[str, Any]:
        accs = [d.accuracy for d in self.devices]
        weights = [d.num_test or 0 for d in self.devices]
        if sum(weights):
            mean = float(np.average(accs, weights=weights))
        else:
            mean = float(np.mean(accs)) if accs else None
        downlinks = [r.downlink_bytes for r in self.rounds if r.downlink_bytes is not None]
        return {
            "rounds": sum(1 for r in self.rounds if r.state == "closed"),
            "updates": sum(r.participants for r in self.rounds),
            "devices": len(self.devices),
            "accuracy_mean": mean,
            "accuracy_p10": float(np.percentile(accs, 10)) if accs else None,
            "uplink_bytes": sum(r.uplink_bytes for r in self.rounds),
            "downlink_bytes": sum(downlinks) if downlinks else None,
            "rejections": sum(self.rejections_by_reason.values()),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


def from_history(history: Any) -> TaskReport:
    """A stored task (``storage.reporting.TaskHistory``) as a report.

    Downlink per round is counted as the announcement each participant fetched: the previous round's
    aggregate (none in round 1) times the participants; the store does not see chunking overhead.
    The per-round sums come from SQL (``storage.reporting``), so this stays cheap for a long run.
    """
    rejected: dict[int | None, int] = {}
    reasons: dict[str, int] = {}
    for r in history.rejections:
        rejected[r.round_no] = rejected.get(r.round_no, 0) + r.count
        reasons[r.reason] = reasons.get(r.reason, 0) + r.count
    aggregate_bytes = {r.round_no: r.aggregate_bytes for r in history.rounds}
    rounds = [
        RoundStats(
            round=r.round_no,
            participants=r.participants,
            quorum=r.quorum,
            late=r.late,
            # The devices this task heard from that sent nothing this round (one update per device).
            missing=history.task_devices - r.participants,
            uplink_bytes=r.uplink_bytes,
            downlink_bytes=(aggregate_bytes.get(r.round_no - 1) or 0) * r.participants,
            accuracy=r.accuracy,
            loss=r.loss,
            density=r.density,
            rejections=rejected.get(r.round_no, 0),
            state=r.state,
            closed_by=r.closed_by,
            duration_s=None if r.closed_at is None else (r.closed_at - r.opened_at).total_seconds(),
        )
        for r in history.rounds
    ]
    devices = [
        DeviceStats(
            device_id=m.device_id,
            accuracy=m.accuracy,
            num_test=history.num_test.get(m.device_id),
            density=(m.metrics or {}).get("density"),
            size_bytes=m.size_bytes,
            latency_ms=m.latency_ms,
        )
        for m in history.models
    ]
    task = history.task
    return TaskReport(
        name=task.task_id,
        source="store",
        strategy=task.strategy,
        fleet=task.fleet,
        arch=task.arch,
        rounds=rounds,
        devices=devices,
        rejections_by_reason=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        downlink_note="previous round's aggregate × participants (as stored, before chunking)",
    )


def from_results(name: str, method: dict[str, Any], header: dict[str, Any]) -> TaskReport:
    """One method of a simulation's results document (``simulator.report.results_document``)."""
    rounds = [
        RoundStats(
            round=r["round"],
            participants=len(r["participants"]),
            quorum=header.get("devices_per_round"),
            uplink_bytes=r["uplink_bytes"],
            downlink_bytes=r["downlink_bytes"],
            accuracy=r.get("accuracy_mean"),
            loss=r.get("train_loss"),
            density=r.get("density"),
            uplink_bits_per_param=_bits_per_param(r, method.get("params_per_update")),
            duration_s=r.get("wall_s") or None,
            closed_by="quorum",
        )
        for r in method.get("rounds", [])
    ]
    devices = [
        DeviceStats(
            device_id=d["device_id"],
            accuracy=d["accuracy"],
            num_test=d.get("num_test"),
            density=d.get("metrics", {}).get("density"),
            size_bytes=_int_or_none(d.get("metrics", {}).get("size_bytes")),
            latency_ms=d.get("metrics", {}).get("latency_ms"),
        )
        for d in method.get("devices", [])
    ]
    return TaskReport(
        name=name,
        source="simulation",
        strategy=name,
        fleet=header.get("config", {}).get("fleet"),
        arch=header.get("arch"),
        rounds=rounds,
        devices=devices,
        downlink_note="bytes on the wire, as the simulator counted them",
    )


def _bits_per_param(record: dict[str, Any], params: int | None) -> float | None:
    if record.get("uplink_bits_per_param") is not None:
        return record["uplink_bits_per_param"]
    if not params or not record["participants"]:
        return None
    return record["uplink_bytes"] * 8 / len(record["participants"]) / params


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
