"""Run a personalized ``.tflite`` model on the device: numpy and a TFLite interpreter, nothing else.

This module must work on an inference-only install (``pip install fedmask[runtime]``), so it never
imports torch. It finds an interpreter in ``ai_edge_litert`` (LiteRT, the current package) or in
``tflite_runtime`` (the older one, still the only wheel on some ARM boards).

Batches: the exported models have a dynamic batch dimension, so `TFLiteModel.predict` resizes the
input once per batch size and runs whole batches. A model that refuses to resize is run one sample
at a time.

LSTM state: TFLite's fused LSTM keeps its state in variable tensors that survive an invocation, so
a second call would start from the first call's final state. The exporter names these tensors
``*_state`` and gives them a dynamic batch in their shape signature; `TFLiteModel` resizes them with
the input and calls ``reset_all_variables()`` before every invocation of such a model. Anyone running
an exported LSTM with a bare interpreter must do the same.

Peak memory: `measure_peak_rss` starts a fresh Python process that loads the model and runs it, and
reads that process's resident-set high-water mark (`peak_rss_bytes`: ``VmHWM`` on Linux, else
``ru_maxrss``). A fresh process is the fair number: in a long-lived process the high-water mark
remembers everything that ran before. The same probe without a model gives the baseline (Python,
numpy and the runtime), reported separately so the model's own share is visible.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RUNTIME_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")
TFLITE_IDENTIFIER = b"TFL3"
DEFAULT_BATCH_SIZE = 256


class RuntimeNotInstalledError(ImportError):
    """Neither TFLite interpreter package is importable."""


class ModelInputError(ValueError):
    """Input data that does not fit the model (shape, dtype, labels)."""


def _runtime_module() -> ModuleType:
    failures = []
    for name in RUNTIME_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            failures.append(f"{name} ({exc})")
    raise RuntimeNotInstalledError(
        "no TFLite interpreter found; install the 'ai-edge-litert' package (module ai_edge_litert) or "
        "'tflite-runtime' (module tflite_runtime). Tried: " + "; ".join(failures)
    )


def load_interpreter(model: str | os.PathLike[str] | bytes, num_threads: int = 1) -> Any:
    """A TFLite ``Interpreter`` for a model file or the model's bytes (tensors not yet allocated)."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads: expected an integer >= 1, got {num_threads!r}")
    runtime = _runtime_module()
    if isinstance(model, bytes | bytearray | memoryview):
        content = bytes(model)
        _check_identifier(content[:8], "model bytes")
        return runtime.Interpreter(model_content=content, num_threads=num_threads)
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    with path.open("rb") as f:
        _check_identifier(f.read(8), f"model file {path}")
    return runtime.Interpreter(model_path=str(path), num_threads=num_threads)


def _check_identifier(head: bytes, what: str) -> None:
    if len(head) < 8 or head[4:8] != TFLITE_IDENTIFIER:
        raise ValueError(f"{what} is not a TFLite model (expected the 'TFL3' file identifier at byte 4)")


class TFLiteModel:
    """A single-input, single-output TFLite classifier with batched prediction and measurements."""

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        num_threads: int = 1,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
        self.interpreter = load_interpreter(model, num_threads)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"expected a model with one input and one output, got {len(inputs)} and {len(outputs)}"
            )
        self._input, self._output = inputs[0]["index"], outputs[0]["index"]
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in inputs[0]["shape"][1:])
        self.input_dtype = np.dtype(inputs[0]["dtype"])
        self.batch_size = batch_size
        self._states = [
            (t["index"], tuple(int(d) for d in t["shape"][1:]))
            for t in self.interpreter.get_tensor_details()
            if t["name"].endswith("_state") and len(t["shape_signature"]) and t["shape_signature"][0] == -1
        ]
        self._batch = 0  # batch size the tensors are allocated for
        self._resizable = True

    # -- running -----------------------------------------------------------------------------------

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model outputs (logits or probabilities, as exported) for a batch ``[N, *input_shape]``."""
        x = self._check_input(x)
        if len(x) == 0:
            raise ModelInputError("input has no samples")
        step = self.batch_size if self._resizable else 1
        chunks = [self._run(x[start : start + step]) for start in range(0, len(x), step)]
        return np.concatenate(chunks)

    def predict_classes(self, x: np.ndarray) -> np.ndarray:
        """Index of the largest output per sample."""
        return self.predict(x).argmax(axis=1)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> float:
        """Accuracy of the predicted classes against integer labels `y`."""
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise ModelInputError(f"labels: expected shape ({len(x)},), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ModelInputError(f"labels: expected integer class indices, got dtype {y.dtype}")
        return float((self.predict_classes(x) == y).mean())

    def measure_latency(self, x_single: np.ndarray, runs: int = 200, warmup: int = 10) -> dict[str, float]:
        """Single-sample latency of ``set_tensor + invoke`` in milliseconds: median, p90, mean, min."""
        if runs < 1:
            raise ValueError(f"runs: expected >= 1, got {runs}")
        x = np.asarray(x_single)
        x = self._check_input(x[None] if x.shape == self.input_shape else x)
        if len(x) != 1:
            raise ModelInputError(f"measure_latency takes one sample, got {len(x)}")
        self._ensure_batch(1)
        for _ in range(warmup):
            self._invoke(x)
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            self._invoke(x)
            times[i] = time.perf_counter() - start
        times *= 1000.0
        return {
            "median_ms": float(np.median(times)),
            "p90_ms": float(np.percentile(times, 90)),
            "mean_ms": float(times.mean()),
            "min_ms": float(times.min()),
            "runs": runs,
        }

    # -- internals ---------------------------------------------------------------------------------

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[1:] != self.input_shape:
            raise ModelInputError(
                f"input: expected samples of shape {self.input_shape} (array [N, "
                f"{', '.join(map(str, self.input_shape))}]), got array of shape {x.shape}"
            )
        model_wants_ints = np.issubdtype(self.input_dtype, np.integer)
        if model_wants_ints and not np.issubdtype(x.dtype, np.integer):
            raise ModelInputError(f"input: the model takes integer token ids, got dtype {x.dtype}")
        if not model_wants_ints and not np.issubdtype(x.dtype, np.number):
            raise ModelInputError(f"input: expected numbers, got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._resizable:
            self._ensure_batch(len(x))
        if self._batch == len(x):
            self._invoke(x)
            return self.interpreter.get_tensor(self._output).copy()
        # one sample at a time (a model that cannot be resized)
        self._ensure_batch(1)
        outputs = []
        for i in range(len(x)):
            self._invoke(x[i : i + 1])
            outputs.append(self.interpreter.get_tensor(self._output).copy())
        return np.concatenate(outputs)

    def _invoke(self, x: np.ndarray) -> None:
        if self._states:
            # TFLite's fused LSTM keeps its state tensors across invocations; every sample starts
            # from a zero state, as in PyTorch.
            self.interpreter.reset_all_variables()
        self.interpreter.set_tensor(self._input, x)
        self.interpreter.invoke()

    def _ensure_batch(self, n: int) -> None:
        if n == self._batch:
            return
        try:
            self._resize(n)
        except (RuntimeError, ValueError) as exc:
            if n == 1:
                raise
            logger.info("model cannot run batches of %d (%s); running one sample at a time", n, exc)
            self._resizable = False
            self._resize(1)

    def _resize(self, n: int) -> None:
        self._batch = 0
        self.interpreter.resize_tensor_input(self._input, [n, *self.input_shape], strict=False)
        for index, shape in self._states:
            self.interpreter.resize_tensor_input(index, [n, *shape], strict=False)
        with _without_delegate_banner():
            self.interpreter.allocate_tensors()
        self._batch = n


# The runtime's C++ side prints this to file descriptor 2 when it applies its default delegate (at
# the first allocate_tensors), on every run of `fedmask predict`: noise, not news.
_DELEGATE_BANNER = b"Created TensorFlow Lite XNNPACK delegate"


@contextlib.contextmanager
def _without_delegate_banner():
    """Capture file descriptor 2 for the block and write back everything but the delegate banner.

    The banner comes from native code, so ``sys.stderr`` cannot catch it; the descriptor is swapped for
    a temporary file only while the interpreter allocates (a few milliseconds)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (a detached service): nothing to tidy
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(True) if _DELEGATE_BANNER not in line]
            if kept:
                os.write(2, b"".join(kept))


# -- peak memory in a fresh process --------------------------------------------------------------------

_RSS_PROBE = """
import json, sys
import numpy as np
from fedmask.device_agent.inference import TFLiteModel, _runtime_module, peak_rss_bytes

path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
_runtime_module()  # the baseline imports the runtime too
if path != "-":
    model = TFLiteModel(path, num_threads=threads, batch_size=1)
    x = np.zeros((1, *model.input_shape), dtype=model.input_dtype)
    for _ in range(runs):
        model.predict(x)
print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
"""


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` would also count the memory
    of the parent that forked this process (the kernel carries the high-water mark across exec), so
    a probe started from a large process (a test run with torch loaded) would report the parent's
    size. Elsewhere ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (bytes on macOS, KiB otherwise).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def measure_peak_rss(model_path: str | os.PathLike[str] | None, num_threads: int = 1, runs: int = 20) -> int:
    """Peak RSS in bytes of a fresh process that loads `model_path` and runs ``runs`` single-sample
    predictions; with ``None``, of the same process without a model (the baseline)."""
    target = "-" if model_path is None else str(model_path)
    if model_path is not None and not Path(model_path).is_file():
        raise FileNotFoundError(f"model file {model_path} does not exist")
    result = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, target, str(num_threads), str(runs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"peak-RSS probe for {target} failed: {result.stderr.strip()[-2000:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"])
