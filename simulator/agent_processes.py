"""A simulated fleet's device agents spread over several OS processes, as real devices are machines.

Why processes: every agent is its own MQTT client (a socket, paho's wake-up socket pair, threads), and
paho's network loop uses ``select()``, which cannot watch a file descriptor >= 1024: past ~250 agents
in one process, connections fail. Each worker process runs at most ``AGENTS_PER_PROCESS`` agents.

The parent starts the workers (``spawn``: a fresh interpreter, no threads or broker sockets inherited),
each worker starts its agents one after the other and reports ``started``, or the first agent that
could not connect and why: ``start`` then stops every worker at once and raises with that reason.
``stop`` asks every worker to stop its agents and returns what the harness reads back from them
(bytes published, per-round timings, receipts, errors).

Training stays as serialized as in one process: the workers share one cross-process semaphore (or a
``train_lock`` the caller passes, e.g. a gate it closes when it stops measuring).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedmask.config import RunError

logger = logging.getLogger(__name__)

# Well under select()'s 1,024 descriptors: ~4 per agent (socket, paho's socket pair, a state file).
AGENTS_PER_PROCESS = 100
FLEET_LOGGERS = ("fedmask.device_agent", "fedmask.protocol")
START_TIMEOUT_S = 120.0  # per worker: interpreter and torch import, then its agents' connections


class AgentStartError(RunError):
    """An agent could not join: the first failure, with the broker's answer (a one-line CLI error)."""


@dataclass
class AgentReport:
    """What the harness reads back from one agent after the run."""

    device_id: str
    bytes_sent: int = 0
    receipts: int = 0
    timings: dict[int, Any] = field(default_factory=dict)  # round -> UpdateTiming
    error: str | None = None


def default_processes(agents: int) -> int:
    return max(1, math.ceil(agents / AGENTS_PER_PROCESS))


class TrainGate:
    """A cross-process training lock that can be closed: once closed, no training starts (the
    measurement is over and the connections are about to close)."""

    def __init__(self, context, slots: int = 1) -> None:
        self._slots = context.Semaphore(slots)
        self._closed = context.Event()

    def close(self) -> None:
        self._closed.set()

    def wait_closed(self) -> None:
        self._closed.wait()

    def __enter__(self) -> TrainGate:
        self._slots.acquire()
        if self._closed.is_set():
            self._slots.release()
            raise RuntimeError("the run is over: no more training")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._slots.release()


class AgentProcesses:
    """``DeviceAgent``s for ``devices`` in ``processes`` worker processes (default: ~100 per process)."""

    def __init__(
        self,
        broker,
        fleet: str,
        devices: list,
        *,
        state_dir: str | Path,
        protocol: str = "5",
        processes: int | None = None,
        train_workers: int = 1,
        agent_options: dict[str, Any] | None = None,
        torch_threads: int | None = None,
        log_level: int | None = None,
    ) -> None:
        self.context = multiprocessing.get_context("spawn")
        count = processes or default_processes(len(devices))
        self.processes = max(1, min(count, len(devices)))
        self.gate = TrainGate(self.context, train_workers)
        self._args = (broker, fleet, str(state_dir), protocol, agent_options or {}, torch_threads)
        self._log_level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        self._groups = [devices[i :: self.processes] for i in range(self.processes)]
        self._workers: list[tuple[multiprocessing.Process, Connection]] = []
        self.started = False

    def start(self, timeout_s: float = START_TIMEOUT_S) -> AgentProcesses:
        """Start every worker and every agent; raise ``AgentStartError`` on the first failure."""
        for group in self._groups:
            parent_end, child_end = self.context.Pipe()
            process = self.context.Process(
                target=_serve,
                args=(group, *self._args, self.gate, self._log_level, child_end),
                name=f"fedmask-agents-{len(self._workers)}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self._workers.append((process, parent_end))
        deadline = time.monotonic() + timeout_s
        try:
            for process, pipe in self._workers:
                status, detail = _receive(process, pipe, deadline)
                if status != "started":
                    raise AgentStartError(detail)
        except BaseException:
            self.terminate()
            raise
        self.started = True
        logger.info(
            "%d agents running in %d process%s",
            sum(map(len, self._groups)),
            self.processes,
            "" if self.processes == 1 else "es",
        )
        return self

    def stop(self, timeout_s: float = 60.0) -> list[AgentReport]:
        """Stop every agent (presence offline, disconnect) and return their reports."""
        self.gate.close()
        for _, pipe in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                pipe.send("stop")
        reports: list[AgentReport] = []
        deadline = time.monotonic() + timeout_s
        problems = []
        for process, pipe in self._workers:
            try:
                status, detail = _receive(process, pipe, deadline)
            except AgentStartError as exc:
                problems.append(str(exc))
                continue
            if status == "stopped":
                reports.extend(detail)
        self.terminate()
        if problems:
            raise AgentStartError("; ".join(problems))
        return reports

    def terminate(self) -> None:
        for process, pipe in self._workers:
            process.join(timeout=5 if process.is_alive() else 0)
            if process.is_alive():
                process.kill()
                process.join(5)
            pipe.close()
        self._workers = []


def _receive(process, pipe: Connection, deadline: float) -> tuple[str, Any]:
    while not pipe.poll(0.1):
        if not process.is_alive():
            if pipe.poll(0):
                break
            raise AgentStartError(f"agent process {process.name} ended (exit code {process.exitcode})")
        if time.monotonic() > deadline:
            raise AgentStartError(f"agent process {process.name} did not answer in time")
    try:
        return pipe.recv()
    except EOFError:
        raise AgentStartError(f"agent process {process.name} ended (exit code {process.exitcode})") from None


def _serve(
    devices, broker, fleet, state_dir, protocol, options, torch_threads, gate, log_level, pipe
) -> None:
    """A worker process: start ``devices``' agents, report, run until told to stop, report again."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(processName)s %(name)s: %(message)s")
    if log_level > logging.DEBUG:  # as in one process: per-agent chatter only at DEBUG
        for name in FLEET_LOGGERS:
            logging.getLogger(name).setLevel(max(log_level, logging.WARNING))
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    from fedmask.device_agent.agent import DeviceAgent

    agents = []
    try:
        for data in devices:
            agent = DeviceAgent(
                broker, fleet, data.device_id, data, state_dir=state_dir, protocol=protocol,
                train_lock=gate, **options,
            )  # fmt: skip
            agent.start()  # raises at once with the broker's answer if it cannot connect
            agents.append(agent)
    except Exception as exc:
        pipe.send(("failed", f"agent {data.device_id}: {exc}"))
        _stop_all(agents)
        return
    pipe.send(("started", len(agents)))
    threading.Thread(target=_quiet_once_closed, args=(gate,), daemon=True).start()
    with contextlib.suppress(EOFError):
        pipe.recv()  # "stop", or EOF when the parent is gone
    _stop_all(agents)
    pipe.send(
        (
            "stopped",
            [AgentReport(a.device_id, a.bytes_sent, a.receipts, dict(a.timings), a.error) for a in agents],
        )
    )


def _quiet_once_closed(gate: TrainGate) -> None:
    # A training refused by the closed gate fails its handler: expected at the end of a run, not news.
    gate.wait_closed()
    for name in FLEET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _stop_all(agents) -> None:
    # In parallel: each agent waits for the PUBACK of its offline presence.
    threads = [threading.Thread(target=agent.stop) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
