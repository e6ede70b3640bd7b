"""Kill points for fault-injection tests: inert unless ``FEDMASK_KILL_AT`` names one.

``FEDMASK_KILL_AT=<point>`` (or ``<point>@<n>``, the n-th time the point is reached, default 1) makes
the process SIGKILL itself at that point, after one line on stderr naming it: no clean MQTT
DISCONNECT, no flush, no atexit, exactly what a power cut does. The points are named where the code
calls :func:`kill_point` (``agent.update.before_publish``, ``aggregator.commit_before_ack``, ...);
``tests/test_faults_property.py`` and ``benchmarks/faults.py`` pick them at random.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENV = "FEDMASK_KILL_AT"

AGENT_POINTS = (
    "agent.update.before_publish",
    "agent.update.mid_chunk",
    "agent.update.after_publish",
    "agent.directive.received",
    "agent.result.before_publish",
    "agent.result.mid_chunk",
    "agent.result.after_publish",
)
AGGREGATOR_POINTS = (
    "aggregator.before_commit",  # a batch judged, not yet stored (first: keeps the CI seeds' plans)
    "aggregator.commit_before_ack",
    "aggregator.ack_before_receipt",
    "aggregator.before_announce",
)


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, nth = spec.partition("@")
    return name.strip(), int(nth) if nth else 1


_target = _parse(os.environ.get(ENV))
_hits = 0
_lock = threading.Lock()


def kill_point(name: str) -> None:
    """SIGKILL this process if ``FEDMASK_KILL_AT`` names ``name`` and this is the chosen hit."""
    global _hits
    if _target is None or _target[0] != name:
        return
    with _lock:
        _hits += 1
        if _hits != _target[1]:
            return
    sys.stderr.write(f"fault injection: SIGKILL at {name} (hit {_hits})\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
