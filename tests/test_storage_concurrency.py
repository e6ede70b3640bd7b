"""Several writers at once, and a crash between commit and acknowledgement, on SQLite and PostgreSQL.

The aggregator side runs in a real child process (this file, run as a script), so SQLite's file locks
and PostgreSQL's row locks are exercised between processes, as in production.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from fedmask.cli import main as fedmask_main
from fedmask.storage import Store

UTC = dt.timezone.utc
FLEET, TASK = "orchard", "orchard-t1"
CHILD_TIMEOUT_S = 120


def payload_for(device: str) -> bytes:
    """4 KiB a parent can recompute to check what the child stored."""
    return hashlib.sha256(device.encode()).digest() * 128


def device_name(index: int) -> str:
    return f"pi-{index:05d}"


def record(store: Store, device: str) -> bool:
    fields = {"base_round": 0, "staleness": 0, "weight": 1.0, "num_samples": 8, "metrics": {"from": device}}
    return store.record_update(TASK, 1, device, payload=payload_for(device), **fields)


def aggregator_process(url: str, count: int) -> None:
    """Child: record ``count`` updates to round 1, printing an ack after each commit, as the aggregator
    acknowledges to the broker only after record_update returned."""
    with Store(url) as store:
        print("ready", flush=True)
        for index in range(count):
            record(store, device_name(index))
            print(f"acked {device_name(index)}", flush=True)


def start_aggregator(url: str, count: int) -> subprocess.Popen[str]:
    """The child process, once it has imported everything and is about to write."""
    child = subprocess.Popen(
        [sys.executable, __file__, url, str(count)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if child.stdout.readline().strip() != "ready":
        raise AssertionError(
            f"aggregator child failed to start: {child.communicate(timeout=CHILD_TIMEOUT_S)[1]}"
        )
    return child


@pytest.fixture
def open_round(store: Store) -> Store:
    store.register_task(FLEET, TASK, spec={}, seed=5, weights_digest="d" * 64, strategy="fedmask", arch="mlp")
    store.open_round(TASK, 1, quorum=1, deadline=dt.datetime.now(UTC) + dt.timedelta(hours=1))
    return store


def test_aggregator_and_query_cli_write_at_once(store_url: str, open_round: Store) -> None:
    updates = 120
    commands = (["db", "prune", "--keep", "1"], ["rounds", "--json"], ["round", "1", "--task", TASK])
    for argv in commands:  # imports done before the child starts: the loop below overlaps its writes
        assert fedmask_main([*argv, "--db", store_url]) == 0
    child = start_aggregator(store_url, updates)
    overlapping_writes = 0
    cli_failures: list[tuple[list[str], int]] = []
    while child.poll() is None:
        # The operator's side: the CLI prunes (a write) and queries while the aggregator ingests.
        for argv in commands:
            if code := fedmask_main([*argv, "--db", store_url]):
                cli_failures.append((argv, code))
        open_round.record_rejection(
            FLEET, reason="unknown_device", detail="probe", device_id=f"x{overlapping_writes}"
        )
        open_round.upsert_device(FLEET, "pi-00000", presence="online")
        if child.poll() is None:
            overlapping_writes += 1
    _, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, stderr
    assert cli_failures == []
    assert overlapping_writes > 0, (
        "the child finished before the parent wrote anything; no concurrency tested"
    )
    stored = {u.device_id: u.payload for u in open_round.accepted_updates(TASK, 1)}
    assert stored == {device_name(i): payload_for(device_name(i)) for i in range(updates)}
    assert open_round.list_rounds(task_id=TASK)[0].rejections == 0  # probes were not attributed to a round
    assert len([d for d in open_round.list_devices(FLEET) if d.presence == "online"]) == 1


def test_every_acknowledged_update_survives_a_crash(store_url: str, open_round: Store) -> None:
    child = start_aggregator(store_url, 100_000)
    acked: list[str] = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while len(acked) < 10 and time.monotonic() < deadline:
        line = child.stdout.readline()
        assert line, f"aggregator child exited early: {child.communicate()[1]}"
        acked.append(line.split()[1])
    child.send_signal(signal.SIGKILL)  # no cleanup, no flush: a power cut as far as the process knows
    child.communicate(timeout=CHILD_TIMEOUT_S)
    assert len(acked) == 10

    with Store(store_url) as restarted:
        stored = {u.device_id: u.payload for u in restarted.accepted_updates(TASK, 1)}
        for device in acked:
            assert stored[device] == payload_for(device)
        # At most the one in flight was committed without its ack being seen; the broker redelivers it.
        assert len(stored) - len(acked) in (0, 1)
        for device in stored:
            assert not record(restarted, device)
        assert restarted.latest_round(TASK).participants == sorted(stored)


def test_racing_deliveries_of_one_update_store_it_once(store_url: str, open_round: Store) -> None:
    devices = [device_name(i) for i in range(8)]
    for device in devices:
        open_round.upsert_device(FLEET, device)  # so the racers collide on the update, not the device
    results: dict[str, list[bool]] = {device: [] for device in devices}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def deliver() -> None:
        with Store(store_url) as store:
            for device in devices:
                barrier.wait()
                try:
                    results[device].append(record(store, device))
                except BaseException as exc:  # collected and asserted on below
                    errors.append(exc)

    racers = [threading.Thread(target=deliver) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert errors == []
    assert {device: sorted(r) for device, r in results.items()} == {
        device: [False, True] for device in devices
    }
    assert [u.device_id for u in open_round.accepted_updates(TASK, 1)] == devices


if __name__ == "__main__":
    aggregator_process(sys.argv[1], int(sys.argv[2]))
