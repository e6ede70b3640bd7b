"""Task files: what an operator writes to start a run, turned into the retained task message."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from fedmask.config import ConfigError, load_config_file
from fedmask.protocol import messages
from fedmask.strategies import TaskSpec, get_strategy

DEFAULT_SCHEDULE: dict[str, Any] = {
    "rounds": 10,
    "quorum": 1,
    # Without an explicit quorum a round waits for 80% of the devices expected for the task (those
    # that joined it and those online), or its deadline: quorum 1 alone closed rounds on the first
    # update, and most of a fleet never contributed.
    "quorum_fraction": 0.8,
    "deadline_s": 120.0,
    "staleness_bound": 2,
    "max_payload": 128 * 1024,
}


def build_task(
    fleet: str, spec: TaskSpec, schedule: dict[str, Any] | None = None, task_id: str | None = None
) -> messages.Task:
    """The task message for ``spec``, with the digest of the frozen weights every device must derive."""
    from fedmask.device_agent.agent import task_digest

    strategy = get_strategy(spec.strategy)
    if not strategy.federated:
        raise ConfigError(
            f"strategy {spec.strategy!r} is an ablation with no federated rounds: nothing to deploy; "
            "run it with `fedmask simulate --strategy " + spec.strategy + "`"
        )
    full = TaskSpec(**{**spec.__dict__, "hyper": strategy.effective_hyper(spec)})
    return messages.Task(
        fleet=fleet,
        task_id=task_id or f"{spec.strategy}-{uuid.uuid4().hex[:12]}",
        strategy=full.strategy,
        arch=full.arch,
        num_classes=full.num_classes,
        seed=full.seed,
        weights_digest=task_digest(full),
        mask_config=full.mask_config,
        arch_kwargs=full.arch_kwargs,
        hyper=full.hyper,
        schedule=messages.Schedule(**_schedule(schedule or {})),
        created_at=time.time(),
    )


def _schedule(given: dict[str, Any]) -> dict[str, Any]:
    """The defaults under what the task gives; an explicit ``quorum`` alone means exactly that quorum."""
    full = {**DEFAULT_SCHEDULE, **given}
    if "quorum" in given and "quorum_fraction" not in given:
        full["quorum_fraction"] = 0.0
    return full


def load_task_file(path: str | Path, fleet: str) -> messages.Task:
    """A YAML/JSON task file: ``strategy``, ``arch``, ``num_classes``, optional ``seed``, ``arch_kwargs``,
    ``mask_config``, ``hyper``, ``schedule`` (rounds, quorum, deadline_s, staleness_bound, max_payload)
    and ``task_id`` (a stable id lets a restarted aggregator resume the same run)."""
    raw = load_config_file(path)
    missing = [k for k in ("strategy", "arch", "num_classes") if k not in raw]
    if missing:
        raise ValueError(f"task file {path}: missing {', '.join(missing)}")
    spec = TaskSpec.from_dict(raw)
    return build_task(fleet, spec, raw.get("schedule"), raw.get("task_id"))
