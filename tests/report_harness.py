"""Stores filled by real runs, for the report and dashboard tests: the tiny federation over a real MQTT
broker (the simulator's MQTT transport: aggregator service, one agent per device, TFLite finalization),
written to the store the test names, as `fedmask simulate --db` does."""

from __future__ import annotations

import struct
from pathlib import Path

from strategy_harness import tiny_federation, tiny_spec, torch_threads

from fedmask.protocol.errors import Rejection
from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.mqtt import MqttRun
from fedmask.storage import Store

FLEET = "sim"
ROUNDS = 3


def run_into_store(db_url: str, strategy: str, out_dir: Path, *, rounds: int = ROUNDS) -> str:
    """One real run of ``strategy`` stored in ``db_url``; returns its task id."""
    config = SimulationConfig(
        dataset="tiny", rounds=rounds, output_dir=out_dir, transport="mqtt", db=db_url, fleet=FLEET
    )
    with torch_threads(1):
        result = MqttRun(config, tiny_federation(), tiny_spec(strategy)).run()
    return result.extra["task_id"]


# (round, reason, device): refused messages as the aggregator records them (its store call).
REJECTIONS = (
    (2, Rejection.MALFORMED_MSGPACK, None),
    (2, Rejection.STALE_ROUND, "dev1"),
    (3, Rejection.STALE_ROUND, "dev2"),
)


def record_rejections(db_url: str, task_id: str) -> None:
    with Store(db_url) as store:
        for round_no, reason, device in REJECTIONS:
            store.record_rejection(
                FLEET,
                reason=reason.value,
                detail=f"test: {reason.value}",
                task_id=task_id,
                round_no=round_no,
                device_id=device,
            )


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (asserting it is one)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])
