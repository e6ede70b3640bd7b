"""``fedmask predict``: classify the samples in a file with a ``.tflite`` model (numpy + interpreter only).

Input files:

* ``.npy``: the samples ``[N, *input_shape]``;
* ``.npz`` with key ``x`` (and optionally ``y``, integer labels);
* a device-data ``.npz`` (``datasets.federated``): its ``x_test`` and ``y_test`` are used.

The model: ``--model FILE``, or by default the device's own model that its agent keeps in the state
directory (``--state-dir``, ``device_agent.local_model``), whose class names are printed beside the
class numbers (also for a ``--model FILE`` with its ``.json`` description beside it).

Output: a table of predicted classes with their names and the model's confidence (softmax of its
outputs), with labels and accuracy when the file has labels, or, with ``--json``, one JSON document.
``--output`` also writes the predictions by suffix: ``.json``,
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
    names: list[str] | None = None  # class index -> name, when the model's description has them

    @property
    def accuracy(self) -> float | None:
        return None if self.labels is None else float((self.classes == self.labels).mean())

    @property
    def confidence(self) -> np.ndarray:
        """The predicted class's probability: softmax of the outputs (the models export logits)."""
        shifted = self.outputs - self.outputs.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return probabilities[np.arange(len(self.classes)), self.classes]

    def name(self, index: int) -> str:
        if self.names is not None and 0 <= index < len(self.names):
            return self.names[index]
        return str(index)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "num_samples": len(self.classes),
            "classes": self.classes.tolist(),
            "confidence": [round(float(c), 6) for c in self.confidence],
        }
        if self.names is not None:
            result["class_names"] = [self.name(int(c)) for c in self.classes]
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
    names: list[str] | None = None,
) -> Predictions:
    """Run `model_path` on every sample of `input_path`."""
    x, y = load_samples(input_path)
    model = TFLiteModel(model_path, num_threads=num_threads, batch_size=batch_size)
    try:
        outputs = model.predict(x)
    except ModelInputError as exc:
        raise ModelInputError(f"{input_path}: {exc}") from None
    return Predictions(classes=outputs.argmax(axis=1), outputs=outputs, labels=y, names=names)


def format_table(predictions: Predictions, limit: int = 20) -> str:
    """Rows ``index  class  [name]  confidence  [label  [name]  ok]``, at most `limit` of them (0: all),
    then a summary line."""
    has_labels = predictions.labels is not None
    named = predictions.names is not None
    width = max((len(n) for n in predictions.names or []), default=4)
    header = f"{'index':>7}  {'class':>5}" + (f"  {'name':<{width}}" if named else "") + "  confidence"
    if has_labels:
        header += f"  {'label':>5}" + (f"  {'label name':<{width}}" if named else "") + "  ok"
    rows = [header.rstrip()]
    shown = len(predictions.classes) if limit <= 0 else min(limit, len(predictions.classes))
    confidence = predictions.confidence
    for i in range(shown):
        cls = int(predictions.classes[i])
        row = f"{i:>7}  {cls:>5}" + (f"  {predictions.name(cls):<{width}}" if named else "")
        row += f"  {confidence[i]:>10.3f}"
        if has_labels:
            label = int(predictions.labels[i])  # type: ignore[index]
            row += f"  {label:>5}" + (f"  {predictions.name(label):<{width}}" if named else "")
            row += f"  {'yes' if label == cls else 'no'}"
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
    if args.output and Path(args.output).suffix.lower() not in OUTPUT_SUFFIXES:
        return _fail(f"--output {args.output}: expected a file ending in one of {', '.join(OUTPUT_SUFFIXES)}")
    try:
        model_path, names = _choose_model(args)
        predictions = predict_file(model_path, args.input, args.num_threads, args.batch_size, names)
    except (FileNotFoundError, ValueError, ImportError) as exc:  # bad files, shapes, missing runtime
        return _fail(str(exc))
    if args.output:
        logger.info("wrote %s", write_predictions(predictions, args.output))
    if args.json:
        print(json.dumps(predictions.to_dict()))
    else:
        print(format_table(predictions, args.limit))
    return 0


def _choose_model(args: argparse.Namespace) -> tuple[Path, list[str] | None]:
    """``--model FILE`` (with the class names of a description beside it), or the device's own."""
    from fedmask.device_agent import local_model

    if args.model:
        path = Path(args.model)
        described = path.with_suffix(".json")
        names = None
        if described.is_file():
            try:
                names = local_model.LocalModel(path, json.loads(described.read_text())).label_names
            except (ValueError, AttributeError):
                names = None  # not one of ours: the model still runs
        return path, names
    try:
        found = local_model.find(args.state_dir, args.device_id, args.task)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no --model given and {exc}") from None
    logger.info("model %s (task %s)", found.path, found.info.get("task_id"))
    return found.path, found.label_names


def _fail(message: str) -> int:
    print(f"fedmask predict: error: {message}", file=sys.stderr)
    return 2
