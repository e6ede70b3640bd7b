"""What a run's final personalized models are: density, compacted size, TFLite speed, dead classes.

Measured on the real final models (each device's ``FinalModel``), for every method alike: a dense
method has density 1 and compacts 1.00x. ``tflite_speedup`` exports each sampled device's model as
it is ("dense": pruned weights stored as zeros) and after compaction, and compares single-thread,
batch-1 TFLite latency measured in alternating rounds so both see the same machine load.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch

from fedmask.datasets.federated import DeviceData
from fedmask.models.compaction import compact_with_report

LATENCY_RUNS = 100
LATENCY_ROUNDS = 3


def _layer_densities(model: Any) -> dict[str, float]:
    if hasattr(model, "layer_densities"):
        return {k: float(v) for k, v in model.layer_densities().items()}
    return {}


@torch.no_grad()
def dead_classes(plain: torch.nn.Module, data: DeviceData, batch: int = 512) -> list[int]:
    """Classes present in the device's training data that its model predicts for none of its inputs."""
    x = np.concatenate([data.x_train, data.x_test]) if len(data.x_test) else data.x_train
    predicted: set[int] = set()
    for start in range(0, len(x), batch):
        logits = plain(torch.from_numpy(np.ascontiguousarray(x[start : start + batch])))
        predicted.update(int(c) for c in logits.argmax(1).unique())
    present = {int(c) for c in np.unique(data.y_train)}
    return sorted(present - predicted)


def device_stats(model: Any, data: DeviceData) -> dict[str, Any]:
    """Density, compaction and dead classes of one device's final model (no TFLite)."""
    plain = model.to_plain() if hasattr(model, "to_plain") else model
    _, report = compact_with_report(plain)
    return {
        "density": float(model.density()) if hasattr(model, "density") else 1.0,
        "density_per_layer": _layer_densities(model),
        "params_dense": report.params_before,
        "params_compacted": report.params_after,
        "compacted_params_ratio": report.size_ratio,
        "units_kept": {layer.name: layer.units_after for layer in report.layers},
        "dead_classes": dead_classes(plain, data),
    }


def tflite_speedup(model: Any, data: DeviceData) -> dict[str, float]:
    """Median single-thread latency of the model exported as is and compacted (ms), and their ratio."""
    from fedmask.device_agent.inference import TFLiteModel
    from fedmask.models.tflite_export import export_tflite

    plain = model.to_plain() if hasattr(model, "to_plain") else model
    compacted, _ = compact_with_report(plain)
    example = torch.from_numpy(np.ascontiguousarray(data.x_train[:1]))
    runners = {
        "dense": TFLiteModel(export_tflite(plain, example), num_threads=1),
        "compacted": TFLiteModel(export_tflite(compacted, example), num_threads=1),
    }
    medians: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(LATENCY_ROUNDS):  # alternate, so both see the same load
        for name, runner in runners.items():
            medians[name].append(runner.measure_latency(data.x_train[0], runs=LATENCY_RUNS)["median_ms"])
    dense, compact = statistics.median(medians["dense"]), statistics.median(medians["compacted"])
    return {"dense_ms": dense, "compacted_ms": compact, "speedup": dense / compact if compact else 0.0}


def summarize(per_device: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The per-method numbers results.json reports, from every device's stats."""
    if not per_device:
        return {}
    stats = list(per_device.values())
    layers = sorted({k for s in stats for k in s["density_per_layer"]})
    summary: dict[str, Any] = {
        "density_mean": float(np.mean([s["density"] for s in stats])),
        "density_per_layer": {
            k: float(np.mean([s["density_per_layer"][k] for s in stats if k in s["density_per_layer"]]))
            for k in layers
        },
        "compacted_params_ratio": float(np.median([s["compacted_params_ratio"] for s in stats])),
        "params_dense": int(np.median([s["params_dense"] for s in stats])),
        "params_compacted_median": float(np.median([s["params_compacted"] for s in stats])),
        "dead_class_devices": sum(1 for s in stats if s["dead_classes"]),
    }
    speedups = [s["tflite"]["speedup"] for s in stats if "tflite" in s]
    if speedups:
        summary["tflite_speedup"] = float(np.median(speedups))
        summary["tflite_devices_measured"] = len(speedups)
        summary["tflite_dense_ms"] = float(
            np.median([s["tflite"]["dense_ms"] for s in stats if "tflite" in s])
        )
        summary["tflite_compacted_ms"] = float(
            np.median([s["tflite"]["compacted_ms"] for s in stats if "tflite" in s])
        )
    return summary
