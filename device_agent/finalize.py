"""The end of a device's run: its personalized model compacted, exported to TFLite, and measured there.

The accuracy a device reports is the TFLite interpreter's on the device's own test data, so the number
in the store is the number of the model that will actually run.
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedmask.models.safetensors_io import dumps as safetensors_dumps
from fedmask.strategies.base import FinalModel

logger = logging.getLogger(__name__)


def mask_file(mask: np.ndarray | None) -> bytes:
    """The final mask as a compressed ``.npz`` (key ``mask``, bool); empty for dense strategies."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, mask=np.zeros(0, dtype=bool) if mask is None else mask.astype(bool))
    return buffer.getvalue()


def personalized_artifacts(
    final: FinalModel, x_test: np.ndarray, y_test: np.ndarray, latency_runs: int = 50
) -> dict:
    """Compact, export and measure a device's final model; returns the Result fields and metrics."""
    from fedmask.device_agent.inference import TFLiteModel, measure_peak_rss, peak_rss_bytes
    from fedmask.models.compaction import compact_with_report
    from fedmask.models.tflite_export import export_tflite

    plain = final.model.to_plain()
    compacted, report = compact_with_report(plain)
    example = torch.from_numpy(np.ascontiguousarray(x_test[:1]))
    tflite = export_tflite(compacted, example)
    runtime = TFLiteModel(tflite)
    accuracy = runtime.evaluate(x_test, y_test) if len(y_test) else 0.0
    latency = runtime.measure_latency(x_test[:1], runs=latency_runs) if len(y_test) else {"median_ms": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        # The model's own footprint: a fresh process that loads it and runs it (what a device needs).
        path = Path(tmp) / "model.tflite"
        path.write_bytes(tflite)
        model_rss = measure_peak_rss(path)
    weights = {k: v.detach().cpu().numpy() for k, v in compacted.state_dict().items()}
    metrics = {
        "accuracy": float(accuracy),
        "torch_accuracy": float(final.evaluation.accuracy),
        "latency_ms": float(latency["median_ms"]),
        "size_bytes": float(len(tflite)),
        "peak_rss_bytes": float(model_rss),
        "agent_peak_rss_bytes": float(peak_rss_bytes()),
        "params_before": float(report.params_before),
        "params_after": float(report.params_after),
        "num_test": float(len(y_test)),
        "density": 1.0,  # dense strategies keep every weight; mask strategies report their own
        **{k: float(v) for k, v in final.metrics.items()},
    }
    return {
        "mask": mask_file(final.mask),
        "weights": safetensors_dumps(weights),
        "tflite": tflite,
        "metrics": metrics,
    }
