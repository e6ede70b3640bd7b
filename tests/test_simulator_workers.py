"""Devices of a round in worker processes and on a Ray cluster: bit-identical to the sequential run,
failures named by device and round, and no worker left behind after Ctrl-C."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from fedmask.config import ConfigError, RunError
from fedmask.datasets.workloads import load_workload
from fedmask.simulator.config import SimulationConfig, validate
from fedmask.simulator.executors import plan, stop_ray
from fedmask.simulator.inproc import InProcessRun
from fedmask.simulator.run import task_spec

# fedmask: masks and scores; fedavg_ft: dense weights and a fine-tuning finalization.
STRATEGIES = ("fedmask", "fedavg_ft")


@pytest.fixture(scope="module")
def hmp_small(hmp_root):
    return load_workload("hmp", hmp_root.parent.parent, num_devices=4, seed=0, stride=128)


def _run(data, tmp_path, strategy: str, **executor) -> tuple[dict, dict]:
    """One run: everything it reports except wall times, and each device's final model state."""
    config = SimulationConfig(
        rounds=3,
        devices_per_round=3,  # sampled participants: devices move between workers
        eval_every=1,
        strategies=[strategy],
        output_dir=tmp_path,
        tflite_devices=0,
        **executor,
    )
    run = InProcessRun(config, data, task_spec(config, strategy, "har_cnn", data.num_classes))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as every worker runs
    try:
        result = run.run()
    finally:
        torch.set_num_threads(before)
    report = result.summary()
    for record in report.get("rounds", []):
        record.pop("wall_s"), record.pop("timings")
    report.pop("wall_s", None)
    finals = {
        device: {name: t.detach().numpy().copy() for name, t in final.model.state_dict().items()}
        | {"mask": final.mask, "accuracy": final.evaluation.accuracy}
        for device, final in run.finals.items()
    }
    return report, finals


def _assert_identical(reference, other, label: str) -> None:
    (report, finals), (other_report, other_finals) = reference, other
    assert other_report == report, label
    assert finals.keys() == other_finals.keys()
    for device, state in finals.items():
        for name, value in state.items():
            assert np.array_equal(other_finals[device][name], value), f"{label}: {device} {name}"


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of two CPUs started here: a real cluster of one node."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    stop_ray()


@pytest.mark.slow
def test_workers_and_ray_are_bit_identical_to_the_sequential_run(hmp_small, tmp_path, local_ray):
    for strategy in STRATEGIES:
        sequential = _run(hmp_small, tmp_path / f"seq-{strategy}", strategy)
        assert sequential[0]["rounds"][-1]["accuracy_mean"] > 1 / 14  # it trained at all
        workers = _run(hmp_small, tmp_path / f"w2-{strategy}", strategy, workers=2)
        _assert_identical(sequential, workers, f"{strategy} --workers 2")
        on_ray = _run(hmp_small, tmp_path / f"ray-{strategy}", strategy, workers=2, backend="ray")
        _assert_identical(sequential, on_ray, f"{strategy} --backend ray")


def test_plan_keeps_devices_where_they_are_while_the_load_allows():
    cost = {"a": 10, "b": 10, "c": 5, "d": 5}.__getitem__
    # No worker holds a device yet: all go to the pool, largest first, for whichever worker is free.
    assigned, pool = plan(["c", "a", "d", "b"], cost, {}, 2)
    assert assigned == {0: [], 1: []} and pool == ["a", "b", "c", "d"]
    holder = {"a": 0, "c": 0, "b": 1, "d": 1}
    assert plan(["a", "b", "c", "d"], cost, holder, 2) == ({0: ["a", "c"], 1: ["b", "d"]}, [])
    # Everyone held by worker 0: half the work moves to worker 1.
    moved, pool = plan(["a", "b", "c", "d"], cost, dict.fromkeys("abcd", 0), 2)
    assert sorted(sum(cost(d) for d in ds) for ds in moved.values()) == [15, 15] and pool == []
    # A held device stays; a new one joins the pool.
    assert plan(["a", "e"], {"a": 10, "e": 10}.__getitem__, {"a": 1}, 2) == ({0: [], 1: ["a"]}, ["e"])


def test_a_failing_device_is_reported_with_device_and_round(hmp_small, tmp_path):
    broken = hmp_small.devices[1]
    # One device's data has channels the model does not have: it cannot train on them.
    bad = dataclasses.replace(
        broken, x_train=np.repeat(broken.x_train, 2, axis=1), x_test=np.repeat(broken.x_test, 2, axis=1)
    )
    data = dataclasses.replace(hmp_small, devices=[bad if d is broken else d for d in hmp_small.devices])
    with pytest.raises(RunError, match=rf"device {broken.device_id} round 1 \(fit\) failed: .*Error"):
        _run(data, tmp_path, "fedmask", workers=2)


def test_a_worker_that_dies_is_reported_with_device_and_round(hmp_small, tmp_path):
    config = SimulationConfig(
        rounds=3, strategies=["fedmask"], output_dir=tmp_path, tflite_devices=0, workers=2
    )
    run = InProcessRun(config, hmp_small, task_spec(config, "fedmask", "har_cnn", hmp_small.num_classes))

    def kill_a_worker(device, round_no, body):
        if round_no == 1:
            for child in _workers(psutil.Process()):
                child.kill()

    run.on_update = kill_a_worker
    with pytest.raises(
        RunError, match=r"device \S+ round 1 \((fit|evaluate)\) failed: worker \d \(pid \d+\) died"
    ):
        run.run()
    assert not _workers(psutil.Process())


def _workers(process: psutil.Process) -> list[psutil.Process]:
    """Worker processes under ``process`` (multiprocessing's resource tracker is not one)."""
    found = []
    for child in process.children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "spawn_main" in cmdline:
            found.append(child)
    return found


@pytest.mark.slow
def test_ctrl_c_leaves_no_worker_behind(hmp_root, tmp_path):
    command = [
        *(sys.executable, "-m", "fedmask.cli", "simulate", "--transport", "inproc", "--workers", "2"),
        *("--dataset", "hmp", "--devices", "4", "--data-option", "stride=128", "--rounds", "50"),
        *("--data-root", str(hmp_root.parent.parent), "--output-dir", str(tmp_path), "--tflite-devices", "0"),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        workers: list[psutil.Process] = []
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            workers = _workers(parent)
        assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else "workers never started"
        time.sleep(3)  # into the rounds
        everyone = parent.children(recursive=True)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        _, alive = psutil.wait_procs(everyone, timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_parallel_runs_need_the_in_process_transport():
    with pytest.raises(ConfigError, match="--transport inproc"):
        validate(SimulationConfig(transport="mqtt", workers=2))
    with pytest.raises(ConfigError, match="--ray-address: only with --backend ray"):
        validate(SimulationConfig(transport="inproc", ray_address="ray://x:1"))
    with pytest.raises(ConfigError, match="--workers"):
        validate(SimulationConfig(transport="inproc", workers=0))
