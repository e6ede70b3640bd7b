"""The device's own copy of its personalized model, kept in the agent's state directory.

``<state_dir>/<device>.models/<task_id>.tflite`` is the model the device built and reported, and
``<task_id>.json`` beside it says what it is: task, strategy, when, the metrics the aggregator got,
and the class names (so ``fedmask predict`` prints "walk", not 7). Both are written through a temporary
file and a rename. Reading needs only the standard library: it runs on an inference-only install.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIX = ".models"


@dataclass(frozen=True)
class LocalModel:
    path: Path  # the .tflite file
    info: dict[str, Any]  # the JSON beside it

    @property
    def label_names(self) -> list[str] | None:
        names = self.info.get("label_names")
        return names if isinstance(names, list) else None


def model_dir(state_dir: str | os.PathLike[str], device_id: str) -> Path:
    return Path(state_dir) / f"{device_id}{SUFFIX}"


def save(
    state_dir: str | os.PathLike[str], device_id: str, task_id: str, tflite: bytes, info: dict[str, Any]
) -> LocalModel:
    """Keep a finalized model and its description (replacing an earlier one of the same task)."""
    folder = model_dir(state_dir, device_id)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"device": device_id, "task_id": task_id, "saved_at": time.time(), **info}
    path = folder / f"{task_id}.tflite"
    _write(path, tflite)
    _write(folder / f"{task_id}.json", (json.dumps(record, indent=2) + "\n").encode())
    return LocalModel(path, record)


def find(
    state_dir: str | os.PathLike[str], device_id: str | None = None, task_id: str | None = None
) -> LocalModel:
    """The device's model of ``task_id``, or its newest one. Without ``device_id``, the state
    directory must hold one device's models. ``FileNotFoundError`` says what is there instead."""
    root = Path(state_dir)
    if device_id is None:
        devices = sorted(p.name[: -len(SUFFIX)] for p in root.glob(f"*{SUFFIX}") if p.is_dir())
        if not devices:
            raise FileNotFoundError(
                f"no model kept in {root} (an agent keeps its model in its --state-dir once it "
                "finalized a task); pass --state-dir DIR, or --model FILE"
            )
        if len(devices) > 1:
            raise FileNotFoundError(
                f"{root} holds the models of {len(devices)} devices ({', '.join(devices)}); "
                "pass --device-id ID"
            )
        device_id = devices[0]
    folder = model_dir(root, device_id)
    described = sorted(folder.glob("*.json")) if folder.is_dir() else []
    models = []
    for info_path in described:
        tflite = info_path.with_suffix(".tflite")
        if tflite.is_file():
            models.append(LocalModel(tflite, json.loads(info_path.read_text())))
    if task_id is not None:
        models = [m for m in models if m.info.get("task_id") == task_id]
    if not models:
        scope = f" for task {task_id}" if task_id is not None else ""
        raise FileNotFoundError(
            f"no model of device {device_id}{scope} in {root} (the agent keeps one there once it "
            "finalized a task); pass --state-dir, or --model FILE"
        )
    return max(models, key=lambda m: float(m.info.get("saved_at", 0.0)))


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
