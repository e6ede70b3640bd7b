"""The inference benchmark's mask handling, and one real (small) run of the script."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmask.models.compaction import compact_with_report
from fedmask.models.zoo import build_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _per_tensor(network, flat: np.ndarray) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for (name, bits), (_, layer) in zip(network.mask_layout(), _tensor_layers(network)):
        spec = next(s for s in layer.specs if layer.key(s.tensor) == name)
        out[name] = flat[offset : offset + bits].reshape(spec.shape)
        offset += bits
    return out


def _tensor_layers(network):
    return [(name, layer) for name, layer in network.layers() for _ in layer.specs]


def test_synthetic_mask_follows_the_layerwise_density(bench) -> None:
    network = build_model("har_cnn", 0, 14)
    flat = bench.synthetic_mask(network, first=0.9, last=0.1, unit_share=1.0, seed=0)
    tensors = _per_tensor(network, flat)
    expected = {
        "conv1.weight": 0.9,
        "conv2.weight": 0.9 - 0.8 / 3,
        "fc1.weight": 0.1 + 0.8 / 3,
        "fc2.weight": 0.1,
    }
    for name, density in expected.items():
        assert tensors[name].mean() == pytest.approx(density, abs=0.03), name
    # unit_share 1: hidden layers drop whole rows and keep the rest dense
    rows = tensors["fc1.weight"]
    assert set(rows.all(axis=1) | ~rows.any(axis=1)) == {True}
    assert not tensors["fc2.weight"].all(axis=1).any()  # the classifier is pruned per weight


def test_synthetic_lstm_mask_drops_the_same_units_from_input_and_recurrent_weights(bench) -> None:
    network = build_model("char_lstm_small", 0, 81)
    tensors = _per_tensor(network, bench.synthetic_mask(network, 0.9, 0.1, 1.0, seed=1))
    for k in (0, 1):
        ih_units = tensors[f"lstm.weight_ih_l{k}"].reshape(4, 64, -1).any(axis=(0, 2))
        hh_units = tensors[f"lstm.weight_hh_l{k}"].reshape(4, 64, -1).any(axis=(0, 2))
        np.testing.assert_array_equal(ih_units, hh_units)
        assert 0 < ih_units.sum() < 64
    network.set_mask(bench.synthetic_mask(network, 0.9, 0.1, 1.0, seed=1))
    _, report = compact_with_report(network.to_plain())
    assert report.params_after < report.params_before / 2


def test_scattered_masks_leave_little_to_compact(bench) -> None:
    network = build_model("har_cnn", 0, 14)
    network.set_mask(bench.synthetic_mask(network, 0.9, 0.1, unit_share=0.0, seed=0))
    _, report = compact_with_report(network.to_plain())
    assert report.params_after > 0.8 * report.params_before


def test_load_mask_reads_both_layouts_and_names_the_problem(bench, tmp_path) -> None:
    network = build_model("har_cnn", 0, 14)
    flat = bench.synthetic_mask(network, 0.9, 0.1, 1.0, seed=3)
    np.savez(tmp_path / "flat.npz", mask=flat)
    np.testing.assert_array_equal(bench.load_mask(network, tmp_path / "flat.npz"), flat)
    np.savez(tmp_path / "named.npz", **_per_tensor(network, flat))
    np.testing.assert_array_equal(bench.load_mask(network, tmp_path / "named.npz"), flat)
    np.savez(tmp_path / "short.npz", mask=flat[:-5])
    with pytest.raises(ValueError, match=r"short\.npz: mask has \d+ bits, har_cnn"):
        bench.load_mask(network, tmp_path / "short.npz")
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        bench.load_mask(network, tmp_path / "missing.npz")


def test_a_quick_run_writes_consistent_json(bench, tmp_path, capsys) -> None:
    network = build_model("har_cnn", 0, 14)
    masks = tmp_path / "masks"
    masks.mkdir()
    np.savez(masks / "har_cnn.npz", mask=bench.synthetic_mask(network, 0.9, 0.1, 1.0, seed=0))
    threads = torch.get_num_threads()  # the script pins torch to one thread
    try:
        assert (
            bench.main(["--models", "har_cnn", "--quick", "--masks", str(masks), "--out", str(tmp_path)]) == 0
        )
    finally:
        torch.set_num_threads(threads)
    assert "dense/compacted" in capsys.readouterr().out
    summary = json.loads((tmp_path / "inference.json").read_text())
    (result,) = summary["results"]
    assert result["mask"].startswith("mask file")
    dense, compacted = result["variants"]["dense"], result["variants"]["compacted"]
    assert result["ratios"]["size"] == pytest.approx(dense["file_bytes"] / compacted["file_bytes"])
    assert compacted["file_bytes"] < dense["file_bytes"]
    assert dense["runs"] >= 200 and dense["min_ms"] <= dense["median_ms"] <= dense["p90_ms"]
    assert result["max_abs_diff_compacted_vs_dense"] < 1e-4
    assert dense["peak_rss_bytes"] > summary["baseline_rss_bytes"]


def test_default_source_is_the_real_final_masks_of_an_accuracy_run(bench, tmp_path, capsys) -> None:
    """The median-density device's mask from <run>/hmp/seed-0/final-masks-fedmask.npz is what runs."""
    network = build_model("har_cnn", 0, 14)
    run = tmp_path / "run"
    (run / "hmp" / "seed-0").mkdir(parents=True)
    masks = {
        f"d{i}": bench.synthetic_mask(network, 0.9, d, 1.0, seed=i) for i, d in enumerate((0.1, 0.3, 0.6))
    }
    np.savez(run / "hmp" / "seed-0" / "final-masks-fedmask.npz", **masks)
    threads = torch.get_num_threads()
    try:
        argv = ["--models", "har_cnn,femnist_cnn", "--quick", "--from-run", str(run), "--out", str(tmp_path)]
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    (result,) = json.loads((tmp_path / "inference.json").read_text())["results"]  # femnist_cnn: no run
    assert result["mask"].startswith("real (hmp, device d1, median density of 3)")
    assert result["density"] == pytest.approx(masks["d1"].mean())
