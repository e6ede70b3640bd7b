"""The comparison benchmark's parts: MAC counts, the validation split, tuning, linking, report."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from strategy_harness import WINDOW, tiny_federation, tiny_spec, torch_threads

from fedmask.models import WeightMode, build_model
from fedmask.simulator.config import SimulationConfig
from fedmask.strategies import TaskSpec, registry
from fedmask.strategies.model_factory import build_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare
import compare_report
import flops
import tuning


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def test_har_cnn_macs_follow_its_layer_shapes():
    model = build_model("har_cnn", seed=0, num_classes=14)
    layers = dict(model.layers())
    numel = {name: sum(s.numel for s in layer.specs) for name, layer in layers.items()}
    # "same" convolutions (kernel 5, padding 2): conv1 sees 128 steps, conv2 128 / 4 after the first pool.
    expected = {
        "conv1": numel["conv1"] * 128,
        "conv2": numel["conv2"] * 32,
        "fc1": numel["fc1"],
        "fc2": numel["fc2"],
    }
    assert flops.layer_forward_macs(model, (3, 128), "float32") == expected
    assert flops.train_macs_per_example(model, (3, 128), "float32") == 3 * sum(expected.values())


def test_lstm_macs_count_every_time_step_and_no_embedding_products():
    model = build_model("char_lstm_small", seed=0, num_classes=30)
    macs = flops.layer_forward_macs(model, (80,), "int64")
    lstm = dict(model.layers())["lstm"]
    assert macs["embed"] == 0
    assert macs["lstm"] == 80 * sum(s.numel for s in lstm.specs)
    assert macs["fc"] == 30 * 64


def test_validation_split_carves_held_out_data_from_train_only():
    data = tiny_federation(train_per_device=41)
    split = tuning.validation_split(data, seed=0)
    for before, after in zip(data.devices, split.devices):
        held = math.ceil(0.2 * before.num_train)
        assert after.num_test == held and after.num_train == before.num_train - held
        rows = {row.tobytes() for row in before.x_train}
        assert {r.tobytes() for r in after.x_test} | {r.tobytes() for r in after.x_train} == rows
        assert not {r.tobytes() for r in after.x_test} & {r.tobytes() for r in after.x_train}
    subset = tuning.validation_split(data, seed=0, max_devices=2)
    again = tuning.validation_split(data, seed=0, max_devices=2)
    assert [d.device_id for d in subset.devices] == [d.device_id for d in again.devices]
    assert len(subset.devices) == 2


def test_grid_centres_are_the_strategies_own_defaults():
    # ``local`` declares no defaults of its own yet (it trains with FedAvg's); the others say theirs.
    strategies = registry()
    for method, lr in tuning.DEFAULT_LR.items():
        source = "fedavg" if method == "local" else method
        spec = TaskSpec(strategy=source, arch="har_cnn", num_classes=4)
        assert strategies[source].effective_hyper(spec)["lr"] == lr, method
        assert len(tuning.learning_rate_grid(method)) == 3


def test_tuning_picks_the_best_validation_accuracy_and_the_default_on_ties():
    class Scored:
        def __init__(self, accuracy):
            self.accuracy = accuracy

        def accuracy_mean(self):
            return self.accuracy

    seen = []

    grid = tuning.learning_rate_grid("fedmask")  # default, default / 3, default * 3
    scores = dict(zip(grid, (0.5, 0.7, 0.7)))

    def run(config, data, method, hyper):
        seen.append(hyper)
        return Scored(scores[hyper["lr"]])

    choice, best = tuning.tune_method("fedmask", None, None, {"extra": 1}, run)
    assert choice.lr == grid[1] and best.accuracy == 0.7  # the first of two equal maxima
    assert choice.val_accuracy == [0.5, 0.7, 0.7]
    assert all(h["extra"] == 1 for h in seen)

    flat = tuning.tune_method("fedmask", None, None, {}, lambda *a: Scored(0.4))[0]
    assert flat.lr == 0.1


def test_linked_settings_and_costs_in_a_real_run():
    data = tiny_federation(train_per_device=41)
    config = SimulationConfig(
        dataset="tiny",
        rounds=2,
        devices_per_round=2,
        strategies=["fedmask", "topk", "fedavg", "local", "fedpm"],
        arch_kwargs=dict(tiny_spec("x").arch_kwargs),
        eval_every=1,
    )
    lrs = {"fedmask": 0.1, "topk": 0.05, "fedavg": 0.05, "local": 0.05, "fedpm": 0.1}
    workload = compare.run_workload("tiny", config, data, "har_cnn", lrs)
    methods = workload["methods"]
    assert list(methods) == config.strategies
    # The envelope estimate is what an empty update (local training) really costs on the wire.
    updates = config.rounds * len(data.devices)  # local trains every device every round (no network)
    local_bits = 8 * methods["local"]["uplink_bytes_total"] / updates / workload["params"]
    plain_metrics = ("loss", "train_accuracy")
    local_envelope = compare.envelope_bits_per_param(config, data, workload["params"], plain_metrics)
    assert local_envelope == pytest.approx(local_bits, rel=0.05)
    envelope = compare.envelope_bits_per_param(config, data, workload["params"])
    # Top-K's body budget is FedMask's measured uplink minus that envelope.
    target = methods["topk"]["hyper"]["target_bits_per_param"]
    assert target == pytest.approx(max(1e-3, methods["fedmask"]["uplink_bits_per_param"] - envelope))
    assert methods["fedpm"]["hyper"]["reset_every"] == 2  # 4 devices, 2 per round
    assert methods["fedmask"]["uplink_reduction_vs_fedavg"] > 20
    assert methods["fedavg"]["accuracy_gain_vs_fedavg"] == 0
    model = build_for(tiny_spec("fedavg"), WeightMode.DENSE)
    per_example = flops.train_macs_per_example(model, (3, WINDOW), "float32")
    assert methods["fedavg"]["train_macs_per_round"] == pytest.approx(per_example * 41)
    assert all(m["train_s_per_round"] > 0 for m in methods.values())
    assert len(methods["fedmask"]["device_accuracy"]) == len(data.devices)
    assert len(methods["fedmask"]["cumulative_bytes"]) == 2


def test_workload_settings_layer_the_accuracy_benchmark_and_ours(tmp_path):
    args = compare.parse_args(["--out", str(tmp_path), "--methods", "fedmask,topk"])
    for quick in (False, True):
        base, quick_overrides = compare.WORKLOADS["fashion_mnist"]
        ours = (compare.QUICK_SIZE if quick else compare.DEFAULT_SIZE)["fashion_mnist"]
        config = compare.workload_config("fashion_mnist", quick, args)
        expected_rounds = quick_overrides.get("rounds", base["rounds"]) if quick else base["rounds"]
        assert config.rounds == ours.get("rounds", expected_rounds)
        assert config.local_epochs == base["local_epochs"]
        assert config.dataset_kwargs["shard_size"] == ours["dataset_kwargs"]["shard_size"]
        assert config.strategies == ["fedmask", "topk"]
        assert config.output_dir == tmp_path / "fashion_mnist"
    assert args.tune_devices == compare.TUNE_DEVICES["default"]
    assert compare.parse_args(["--quick"]).tune_devices == compare.TUNE_DEVICES["quick"]


def test_report_writes_tables_and_plots(tmp_path):
    method = {
        "accuracy_mean": 0.8,
        "accuracy_p10": 0.6,
        "uplink_bits_per_param": 0.5,
        "downlink_bits_per_param": 0.1,
        "uplink_bytes_total": 2_000_000,
        "downlink_bytes_total": 1_000_000,
        "train_s_per_round": 0.2,
        "train_gflops_per_round": 1.5,
        "lr": 0.1,
        "wall_s": 12.0,
        "cumulative_bytes": [100, 200],
        "round_accuracy": [None, 0.8],
        "device_accuracy": [0.6, 0.9],
    }
    workload = {
        "dataset": "hmp",
        "partition": "natural",
        "devices": 2,
        "devices_per_round": 2,
        "rounds": 2,
        "local_epochs": 1,
        "arch": "har_cnn",
        "params": 1000,
        "methods": {
            "fedmask": method,
            "fedavg": {**method, "accuracy_mean": 0.7, "uplink_bits_per_param": 32.0},
        },
    }
    document = {"quick": True, "seed": 0, "wall_s": 60.0, "workloads": {"hmp": workload}}
    text = compare_report.markdown(document)
    assert "| fedmask | 0.800 (0.50) |" in text and "| fedavg | 0.700 (32.00) |" in text
    assert "| fedmask | 0.800 | 0.600 | 0.500 | 0.100 | 2.00 | 1.00 |" in text
    for plot in (compare_report.plot_accuracy_vs_traffic, compare_report.plot_device_accuracy):
        path = plot(document, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
