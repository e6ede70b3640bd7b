"""The on-device runtime wrapper, run with the real TFLite interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedmask.device_agent import inference
from fedmask.device_agent.inference import (
    ModelInputError,
    RuntimeNotInstalledError,
    TFLiteModel,
    load_interpreter,
    measure_peak_rss,
)
from fedmask.models.layers import LastStepLSTM
from fedmask.models.tflite_export import export_tflite


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).eval()
    path = tmp_path_factory.mktemp("models") / "cnn.tflite"
    export_tflite(model, torch.zeros(1, 1, 16, 16), path)
    return path, model


@pytest.fixture(scope="module")
def lstm_model() -> tuple[bytes, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 4), LastStepLSTM(4, 8, 2), nn.Linear(8, 30)).eval()
    return export_tflite(model, torch.zeros(1, 10, dtype=torch.int64)), model


def _torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_predict_runs_batches_larger_and_smaller_than_batch_size(cnn_file) -> None:
    path, model = cnn_file
    x = np.random.default_rng(0).random((23, 1, 16, 16), dtype=np.float32)
    runtime = TFLiteModel(path, batch_size=8)  # chunks of 8, 8 and 7: two resizes
    assert runtime.input_shape == (1, 16, 16)
    assert runtime.input_dtype == np.float32
    np.testing.assert_allclose(runtime.predict(x), _torch(model, x), atol=1e-5)
    one = runtime.predict(x[:1])
    np.testing.assert_allclose(one, _torch(model, x[:1]), atol=1e-5)


def test_float64_input_is_converted(cnn_file) -> None:
    path, model = cnn_file
    x = np.random.default_rng(1).random((3, 1, 16, 16))
    np.testing.assert_allclose(TFLiteModel(path).predict(x), _torch(model, x.astype(np.float32)), atol=1e-5)


def test_lstm_batches_resize_its_state_and_keep_no_state_between_calls(lstm_model) -> None:
    data, model = lstm_model
    rng = np.random.default_rng(2)
    runtime = TFLiteModel(data)
    # Same batch size again and again (no re-allocation in between): with only 10 time steps a
    # state left over from the previous call would shift the outputs by ~1e-3.
    for batch in (5, 5, 5, 7, 1, 1):
        x = rng.integers(0, 30, (batch, 10))
        np.testing.assert_allclose(runtime.predict(x), _torch(model, x), atol=1e-5)


def test_a_bare_interpreter_keeps_lstm_state_which_is_why_the_wrapper_resets_it(lstm_model) -> None:
    data, model = lstm_model
    interpreter = load_interpreter(data)
    interpreter.allocate_tensors()
    index, output = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    x = np.random.default_rng(5).integers(0, 30, (1, 10))
    results = []
    for _ in range(2):
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        results.append(interpreter.get_tensor(output).copy())
    np.testing.assert_allclose(results[0], _torch(model, x), atol=1e-5)
    assert np.abs(results[1] - results[0]).max() > 1e-5  # the second run started from a stale state


def test_evaluate_is_the_accuracy_of_argmax(cnn_file) -> None:
    path, model = cnn_file
    x = np.random.default_rng(3).random((40, 1, 16, 16), dtype=np.float32)
    predicted = _torch(model, x).argmax(1)
    labels = predicted.copy()
    labels[:10] = (labels[:10] + 1) % 5  # exactly 10 wrong
    assert TFLiteModel(path).evaluate(x, labels) == pytest.approx(0.75)
    with pytest.raises(ModelInputError, match=r"labels: expected shape \(40,\)"):
        TFLiteModel(path).evaluate(x, labels[:5])


def test_measure_latency(cnn_file) -> None:
    path, _ = cnn_file
    runtime = TFLiteModel(path)
    stats = runtime.measure_latency(np.zeros((1, 16, 16), np.float32), runs=50)
    assert stats["runs"] == 50
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    # afterwards batches still work (latency runs at batch 1)
    assert runtime.predict(np.zeros((4, 1, 16, 16), np.float32)).shape == (4, 5)


def test_wrong_inputs_get_clear_errors(cnn_file, lstm_model, tmp_path) -> None:
    path, _ = cnn_file
    runtime = TFLiteModel(path)
    with pytest.raises(ModelInputError, match=r"expected samples of shape \(1, 16, 16\).*\(2, 16, 16\)"):
        runtime.predict(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ModelInputError, match="integer token ids"):
        TFLiteModel(lstm_model[0]).predict(np.zeros((1, 10), np.float32))
    not_a_model = tmp_path / "x.tflite"
    not_a_model.write_bytes(b"definitely not a flatbuffer")
    with pytest.raises(ValueError, match=r"x\.tflite is not a TFLite model"):
        load_interpreter(not_a_model)
    with pytest.raises(FileNotFoundError, match=r"missing\.tflite"):
        load_interpreter(tmp_path / "missing.tflite")


def test_missing_runtime_names_both_packages(monkeypatch) -> None:
    for name in inference.RUNTIME_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail, as if not installed
    with pytest.raises(RuntimeNotInstalledError, match=r"ai-edge-litert.*tflite-runtime"):
        load_interpreter(b"....TFL3")


def test_runtime_works_with_torch_unimportable(cnn_file, tmp_path) -> None:
    path, model = cnn_file
    x = np.random.default_rng(4).random((6, 1, 16, 16), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        from fedmask.device_agent.inference import TFLiteModel
        from fedmask.cli import main
        out = TFLiteModel({str(path)!r}).predict(np.load({str(tmp_path / "x.npy")!r}))
        np.save({str(tmp_path / "out.npy")!r}, out)
        assert main(["predict", "--model", {str(path)!r}, "--input", {str(tmp_path / "x.npy")!r}]) == 0
        assert sys.modules["torch"] is None
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "6 samples" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), _torch(model, x), atol=1e-5)


def test_peak_rss_of_a_fresh_process_sees_the_weights(tmp_path) -> None:
    weights = nn.Linear(2048, 4096)  # 32 MiB of float32 weights
    path = tmp_path / "big.tflite"
    export_tflite(nn.Sequential(weights).eval(), torch.zeros(1, 2048), path)
    size = path.stat().st_size
    baseline = measure_peak_rss(None)
    with_model = measure_peak_rss(path, runs=3)
    assert baseline > 10 * 2**20  # Python, numpy and the runtime
    assert with_model - baseline > 0.9 * size
