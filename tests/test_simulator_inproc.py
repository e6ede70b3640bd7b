"""The in-process simulator on real HMP data: it learns, it is reproducible, and it counts real bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmask.datasets.workloads import load_workload
from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.inproc import InProcessRun
from fedmask.simulator.run import run_simulation, task_spec

SMALL_HMP = {"dataset": "hmp", "devices": 4, "dataset_kwargs": {"stride": 128}}


@pytest.fixture(scope="module")
def hmp_small(hmp_root):
    return load_workload("hmp", hmp_root.parent.parent, num_devices=4, seed=0, stride=128)


def test_quick_fedmask_run_on_real_hmp_beats_chance_by_a_wide_margin(hmp_root, tmp_path):
    config = SimulationConfig(
        **SMALL_HMP,
        data_root=hmp_root.parent.parent,
        rounds=3,
        strategies=["fedmask"],
        output_dir=tmp_path,
    )
    document = run_simulation(config, progress=False)
    fedmask = document["methods"]["fedmask"]
    chance = 1 / 14
    assert fedmask["accuracy_mean"] > chance + 0.3
    # Uplink: one bit per masked parameter at most, counted from the encoded messages.
    assert 0 < fedmask["uplink_bits_per_param"] <= 1.05
    assert (
        json.loads((tmp_path / "results.json").read_text())["methods"]["fedmask"]["accuracy_mean"]
        == (fedmask["accuracy_mean"])
    )
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "uplink.png").stat().st_size > 0
    assert "| fedmask |" in (tmp_path / "results.md").read_text()


def _final_masks(data, tmp_path) -> dict[str, np.ndarray]:
    config = SimulationConfig(rounds=2, strategies=["fedmask"], output_dir=tmp_path, eval_every=0)
    spec = task_spec(config, "fedmask", "har_cnn", data.num_classes)
    run = InProcessRun(config, data, spec)
    run.run()
    return {device: final.mask for device, final in run.finals.items()}


def test_same_seed_gives_the_same_masks_bit_for_bit(hmp_small, tmp_path):
    first = _final_masks(hmp_small, tmp_path / "a")
    second = _final_masks(hmp_small, tmp_path / "b")
    assert first.keys() == second.keys()
    for device in first:
        assert np.array_equal(first[device], second[device]), device
