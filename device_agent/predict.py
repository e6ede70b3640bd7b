"""``fedmask predict``: classify the samples in a file with a ``.tflite`` model (numpy + interpreter only).

Input files:

* ``.npy``: the samples ``[N, *input_shape]``;
* ``.npz`` with key ``x`` (and optionally ``y``, integer labels);
* a device-data ``.npz`` (``datasets.federated``): its ``x_test`` and ``y_test`` are used.

Output: a table of predicted classes (with labels and accuracy when the file has labels) or, with
``--json``, one JSON document. ``--output`` also writes the predictions by suffix: ``.json``,
``.csv`` (index, class[, label]), ``.npy`` (classes) or ``.npz`` (``classes``, ``outputs``[, ``labels``]).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmask.device_agent.inference import ModelInputError, TFLiteModel

# npz key pairs tried in order: a plain (x, y) file, then a device-data file's test split.
_NPZ_KEYS = (("x", "y"), ("x_test", "y_test"))
OUTPUT_SUFFIXES = (".json", ".csv", ".npy", ".npz")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictions:
    """What the model said about each sample; `labels` and `accuracy` only when the input had labels."""

    classes: np.ndarray
    outputs: np.ndarray
    labels: np.ndarray | None = None

    @property
    def accuracy(self) -> float | None:
        return None if self.labels is None else float((self.classes == self.labels).mean())

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"num_samples": len(self.classes), "classes": self.classes.tolist()}
        if self.labels is not None:
            result["labels"] = self.labels.tolist()
            result["accuracy"] = self.accuracy
        return result


def load_samples(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples and (if present) integer labels from a ``.npy`` or ``.npz`` file, never unpickling."""
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"input file {src} does not exist")
    try:
        loaded = np.load(src, allow_pickle=False)
    except ValueError as exc:
        raise ModelInputError(f"{src}: cannot read as .npy/.npz without pickle ({exc})") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelInputError(f"{src}: not a valid .npy or .npz file ({exc})") from exc
    if isinstance(loaded, np.ndarray):
        return loaded, None
    with loaded as archive:
        keys = set(archive.files)
        for x_key, y_key in _NPZ_KEYS:
            if x_key in keys:
                x = _read_array(archive, src, x_key)
                y = _read_array(archive, src, y_key) if y_key in keys else None
                return x, _check_labels(src, y_key, y, len(x))
    raise ModelInputError(
        f"{src}: expected key 'x' (with optional 'y') or a device file's 'x_test'/'y_test'; "
        f"found keys {sorted(keys)}"
    )


def _read_array(archive: Any, src: Path, key: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise ModelInputError(f"{src}: key {key!r} cannot be read without pickle ({exc})") from exc


def _check_labels(src: Path, key: str, y: np.ndarray | None, n: int) -> np.ndarray | None:
    if y is None:
        return None
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ModelInputError(
            f"{src}: {key!r} must be {n} integer labels, got {y.dtype} array of shape {y.shape}"
        )
    return y


def predict_file(
    model_path: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    num_threads: int = 1,
    batch_size: int = 256,
) -> Predictions:
    """Run `model_path` on every sample of `input_path`."""
    x, y = load_samples(input_path)
    model = TFLiteModel(model_path, num_threads=num_threads, batch_size=batch_size)
    try:
        outputs = model.predict(x)
    except ModelInputError as exc:
        raise ModelInputError(f"{input_path}: {exc}") from None
    return Predictions(classes=outputs.argmax(axis=1), outputs=outputs, labels=y)


def format_table(predictions: Predictions, limit: int = 20) -> str:
    """Rows ``index  class  [label  ok]``, at most `limit` of them (0: all), then a summary line."""
    has_labels = predictions.labels is not None
    header = f"{'index':>7}  {'class':>5}" + (f"  {'label':>5}  ok" if has_labels else "")
    rows = [header]
    shown = len(predictions.classes) if limit <= 0 else min(limit, len(predictions.classes))
    for i in range(shown):
        row = f"{i:>7}  {int(predictions.classes[i]):>5}"
        if has_labels:
            label = int(predictions.labels[i])  # type: ignore[index]
            row += f"  {label:>5}  {'yes' if label == predictions.classes[i] else 'no'}"
        rows.append(row)
    if shown < len(predictions.classes):
        rows.append(f"... {len(predictions.classes) - shown} more (use --limit 0 to show all)")
    summary = f"{len(predictions.classes)} samples"
    if has_labels:
        correct = int((predictions.classes == predictions.labels).sum())
        summary += f", accuracy {predictions.accuracy:.4f} ({correct}/{len(predictions.classes)})"
    rows.append(summary)
    return "\n".join(rows)


def write_predictions(predictions: Predictions, path: str | os.PathLike[str]) -> Path:
    """Write predictions in the format the suffix names (see module docstring)."""
    dest = Path(path)
    suffix = dest.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(
            f"--output {dest}: unknown suffix {dest.suffix!r}; expected one of {OUTPUT_SUFFIXES}"
        )
    if suffix == ".json":
        dest.write_text(json.dumps(predictions.to_dict()) + "\n")
    elif suffix == ".npy":
        np.save(dest, predictions.classes)
    elif suffix == ".npz":
        extra = {} if predictions.labels is None else {"labels": predictions.labels}
        np.savez(dest, classes=predictions.classes, outputs=predictions.outputs, **extra)
    else:
        with dest.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "class"] + (["label"] if predictions.labels is not None else []))
            for i, cls in enumerate(predictions.classes):
                label = [] if predictions.labels is None else [int(predictions.labels[i])]
                writer.writerow([i, int(cls), *label])
    return dest


def run(args: argparse.Namespace) -> int:
    """The ``fedmask predict`` handler: exit status 0 on success, 2 on bad input."""
    if not args.model:
        return _fail("--model is required (or set FEDMASK_MODEL, or 'model' in the config file)")
    if args.output and Path(args.output).suffix.lower() not in OUTPUT_SUFFIXES:
        return _fail(f"--output {args.output}: expected a file ending in one of {', '.join(OUTPUT_SUFFIXES)}")
    try:
        predictions = predict_file(args.model, args.input, args.num_threads, args.batch_size)
    except (FileNotFoundError, ValueError, ImportError) as exc:  # bad files, shapes, missing runtime
        return _fail(str(exc))
    if args.output:
        logger.info("wrote %s", write_predictions(predictions, args.output))
    if args.json:
        print(json.dumps(predictions.to_dict()))
    else:
        print(format_table(predictions, args.limit))
    return 0


def _fail(message: str) -> int:
    print(f"fedmask predict: error: {message}", file=sys.stderr)
    return 2
