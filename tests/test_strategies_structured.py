"""Structured FedMask on real data: models compact, no class dies, FT-only sends nothing, budgets hold."""

from __future__ import annotations

import numpy as np
import pytest

from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.run import run_simulation
from fedmask.strategies.training import balanced_class_weights


def test_quick_hmp_run_gives_final_models_that_compact_at_least_2x(hmp_root, tmp_path):
    config = SimulationConfig(
        dataset="hmp",
        devices=4,
        dataset_kwargs={"stride": 128},
        data_root=hmp_root.parent.parent,
        rounds=3,
        strategies=["fedmask", "ft_only"],
        output_dir=tmp_path,
        eval_every=0,
        tflite_devices=2,
    )
    document = run_simulation(config, progress=False)
    fedmask, ft_only = document["methods"]["fedmask"], document["methods"]["ft_only"]
    assert fedmask["compacted_params_ratio"] >= 2.0
    assert fedmask["density_mean"] < 0.5
    assert fedmask["density_per_layer"]["fc2.weight"] <= 0.5
    assert fedmask["tflite_devices_measured"] == 2 and fedmask["tflite_speedup"] > 0
    for device in fedmask["devices"]:
        assert device["metrics"]["compacted_params_ratio"] >= 2.0
    # The ablation really skips the mask rounds: no round, no byte on the wire, same finalization.
    assert (
        ft_only["rounds"] == []
        and ft_only["uplink_bytes_total"] == 0
        and ft_only["downlink_bytes_total"] == 0
    )
    assert ft_only["compacted_params_ratio"] >= 2.0
    masks = np.load(tmp_path / "final-masks-fedmask.npz")
    assert sorted(masks.files) == sorted(d["device_id"] for d in fedmask["devices"])


def test_no_dead_class_on_a_quick_fashion_mnist_shards_run(tmp_path):
    # Two classes per device (pathological shards): a dead classifier row would show as a dead class.
    config = SimulationConfig(
        dataset="fashion_mnist",
        partition="shards",
        devices=6,
        devices_per_round=3,
        rounds=2,
        local_epochs=1,
        arch_kwargs={"width": 0.25},
        dataset_kwargs={"shard_size": 100, "test_per_device": 50},
        strategies=["fedmask"],
        output_dir=tmp_path,
        eval_every=0,
        tflite_devices=0,
    )
    fedmask = run_simulation(config, progress=False)["methods"]["fedmask"]
    assert fedmask["dead_class_devices"] == 0
    assert fedmask["compacted_params_ratio"] >= 2.0
    assert fedmask["accuracy_mean"] > 0.6


def test_device_classes_get_their_own_budgets(hmp_root, tmp_path):
    config = SimulationConfig(
        dataset="hmp",
        devices=4,
        dataset_kwargs={"stride": 128},
        data_root=hmp_root.parent.parent,
        rounds=2,
        strategies=["fedmask"],
        output_dir=tmp_path,
        eval_every=0,
        tflite_devices=0,
        device_classes=["pi_zero", "jetson"],
        hyper={
            "fedmask": {
                "unit_keep_by_class": {"pi_zero": 0.25, "jetson": 1.0},
                "finetune_epochs": 1,
                "finetune_min_steps": 0,
            }
        },
    )
    devices = run_simulation(config, progress=False)["methods"]["fedmask"]["devices"]
    ratios = [d["metrics"]["compacted_params_ratio"] for d in devices]
    # Round-robin: devices 0 and 2 are pi_zero (a quarter of the hidden units), 1 and 3 keep every unit.
    assert min(ratios[0], ratios[2]) > 4.0
    assert max(ratios[1], ratios[3]) < 1.5


def test_balanced_class_weights():
    w = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert w[0] * 3 == pytest.approx(w[1] * 1)  # every present class weighs the same in total
    assert w[2] == 1.0
    assert np.allclose(balanced_class_weights(np.array([0, 1]), 2, power=0.5), 1.0)


def test_the_ft_only_ablation_cannot_be_deployed():
    from fedmask.aggregator.tasks import build_task
    from fedmask.config import ConfigError
    from fedmask.strategies import TaskSpec

    with pytest.raises(ConfigError, match="no federated rounds"):
        build_task("fleet", TaskSpec(strategy="ft_only", arch="har_cnn", num_classes=14))
