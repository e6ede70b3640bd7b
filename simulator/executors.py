"""Where the devices of a simulated round run: in this process, in worker processes, or on Ray actors.

An executor runs one kind of device call (``fit``, ``evaluate``, ``finalize``) for a list of devices
and returns each device's result; the caller (``simulator.inproc``) then encodes, counts and aggregates
exactly as in a sequential run, in the same device order. Results are bit-identical to the sequential
run because a device's computation depends only on the task, its data, its own state and the body it
receives (its RNGs are seeded from (seed, device, round)), never on which process runs it or when.

Each worker hosts a set of devices (``DeviceHost``): their client halves, created on first use and kept
between rounds, so a device's state (scores, weights, bases) stays where it trained. The parent plans
each call (``plan``): a device stays on the worker that holds it while the load allows, the rest go to
the least-loaded worker (largest first); a device that moves travels as its pickled client half, data
aside. Torch runs one thread per worker. A failure names the device, round and call; Ctrl-C or any
error stops every worker before the run ends.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import pickle
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from fedmask.config import RunError
from fedmask.datasets.federated import DeviceData
from fedmask.strategies import TaskSpec, get_strategy

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often a wait for workers checks that they are all alive
STICKY_SLACK = 1.1  # a device stays on its worker while that worker's load is within 10% of the mean


@dataclass(frozen=True)
class Call:
    """One device call: ``kind`` at ``round_no`` with the body whose cache key is ``body_key``."""

    kind: str
    device: str
    round_no: int
    body_key: Any


def failure(call: Call, detail: str, what: str | None = None) -> str:
    """A device call's failure as one line that says where it happened (the worker's traceback, if
    any, is logged at debug level)."""
    summary, _, trace = detail.strip().partition("\n\n")
    if trace:
        logger.debug("device %s round %d: worker traceback:\n%s", call.device, call.round_no, trace)
    return f"device {call.device} round {call.round_no} ({what or call.kind}) failed: {summary}"


class DeviceHost:
    """The devices one worker simulates: their data and client halves, and the body being delivered."""

    def __init__(self, spec: TaskSpec, devices: dict[str, DeviceData] | None = None) -> None:
        self.spec = spec
        self.strategy = get_strategy(spec.strategy)
        self.data: dict[str, DeviceData] = dict(devices or {})
        self.clients: dict[str, Any] = {}
        self.body_key: Any = None
        self.body: Any = None

    def run(self, call: Call, body: Any = None, data: DeviceData | None = None, state: bytes | None = None):
        if data is not None:
            self.data[call.device] = data
        if call.body_key != self.body_key:
            self.body_key, self.body = call.body_key, body
        if state is not None:
            client = pickle.loads(state)
            client.data = self.data[call.device]
            self.clients[call.device] = client
        client = self.clients.get(call.device)
        if client is None:
            client = self.clients[call.device] = self.strategy.client(self.spec, self.data[call.device])
        if call.kind == "fit":
            return client.fit(self.body, call.round_no)
        if call.kind == "evaluate":
            return client.evaluate(self.body)
        from fedmask.simulator.model_stats import device_stats

        final = client.finalize(self.body)
        return final, device_stats(final.model, client.data)

    def export(self, device: str) -> bytes:
        """Hand a device over to another worker: its client half, without the data (the target has it)."""
        client = self.clients.pop(device)
        data, client.data = client.data, None
        try:
            return pickle.dumps(client, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            client.data = data

    def handle(self, method: str, args: tuple) -> tuple[bool, Any]:
        """A request: ``(True, (result, seconds))`` or ``(False, "Type: message\n\ntraceback")``."""
        try:
            started = time.perf_counter()
            result = getattr(self, method)(*args)
            return True, (result, time.perf_counter() - started)
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc(limit=-8)}"


class SequentialExecutor:
    """Every device in this process, one after another: the reference the parallel executors match."""

    def __init__(self, spec: TaskSpec, devices: Sequence[DeviceData]) -> None:
        self.host = DeviceHost(spec, {d.device_id: d for d in devices})
        self.device_s = 0.0  # seconds the devices of the last ``run`` computed, summed over devices

    def run(self, kind: str, devices: Sequence[str], round_no: int, body: Any) -> dict[str, Any]:
        results = {}
        started = time.perf_counter()
        for device in devices:
            call = Call(kind, device, round_no, (kind, round_no))
            try:
                results[device] = self.host.run(call, body)
            except Exception as exc:
                raise RunError(failure(call, f"{type(exc).__name__}: {exc}")) from exc
        self.device_s = time.perf_counter() - started
        return results

    def close(self) -> None:
        pass


def plan(devices: Sequence[str], cost: Callable[[str], float], holder: dict[str, int], workers: int):
    """Which worker runs which device: stay where held while the load allows, else least-loaded first."""
    order = sorted(devices, key=lambda d: -cost(d))
    limit = STICKY_SLACK * sum(cost(d) for d in devices) / workers
    load = [0.0] * workers
    assigned: dict[int, list[str]] = {w: [] for w in range(workers)}
    rest = []
    for device in order:
        w = holder.get(device)
        if w is not None and load[w] + cost(device) <= limit:
            assigned[w].append(device)
            load[w] += cost(device)
        else:
            rest.append(device)
    for device in rest:
        w = min(range(workers), key=lambda i: (load[i], i))
        assigned[w].append(device)
        load[w] += cost(device)
    return assigned


class WorkerPool:
    """Common scheduling over N workers that each take one request at a time, in order.

    Subclasses say how a request is sent (``_send``), how finished ones are collected (``_collect``:
    ``[(worker, ok, value)]``, waiting at most ``POLL_S``) and how workers are stopped (``close``).
    """

    def __init__(self, spec: TaskSpec, devices: Sequence[DeviceData], workers: int) -> None:
        self.spec = spec
        self.workers = workers
        self.by_id = {d.device_id: d for d in devices}
        self.holder: dict[str, int] = {}  # device -> worker holding its client half
        self.has_data: set[tuple[int, str]] = set()
        self.body_key: dict[int, Any] = {}
        self.device_s = 0.0  # seconds the devices of the last ``run`` computed, summed over devices

    def cost(self, kind: str) -> Callable[[str], float]:
        if kind == "evaluate":
            return lambda d: len(self.by_id[d].y_test) + 1
        return lambda d: len(self.by_id[d].y_train) + 1

    def run(self, kind: str, devices: Sequence[str], round_no: int, body: Any) -> dict[str, Any]:
        assigned = plan(devices, self.cost(kind), self.holder, self.workers)
        moving = {d: self.holder[d] for w, ds in assigned.items() for d in ds if self.holder.get(d, w) != w}
        queues: dict[int, deque] = {w: deque() for w in range(self.workers)}
        for device, source in moving.items():
            queues[source].append(("export", device))
        for w, ds in assigned.items():  # devices that move run last: their state comes from another worker
            queues[w].extend(("run", d) for d in ds if d not in moving)
            queues[w].extend(("run", d) for d in ds if d in moving)
        states: dict[str, bytes] = {}
        results: dict[str, Any] = {}
        busy: dict[int, tuple[str, Call]] = {}
        key = (kind, round_no)
        self.device_s = 0.0
        while len(results) < len(devices):
            for w, queue in queues.items():
                if w in busy or not queue:
                    continue
                method, device = queue[0]
                call = Call(kind, device, round_no, key)
                if method == "export":
                    self._send(w, "export", (device,))
                elif device in moving and device not in states:
                    continue  # its state is still on the way
                else:
                    self._send(w, "run", self._run_args(w, call, body, states.pop(device, None)))
                    self.holder[device] = w
                queue.popleft()
                busy[w] = (method, call)
            for w, ok, value in self._collect():
                method, call = busy.pop(w)
                if not ok:
                    raise RunError(failure(call, value, "handing over" if method == "export" else None))
                value, seconds = value
                if method == "export":
                    states[call.device] = value
                else:
                    results[call.device] = value
                    self.device_s += seconds
        return results

    def _run_args(self, w: int, call: Call, body: Any, state: bytes | None) -> tuple:
        data = None
        if (w, call.device) not in self.has_data:
            data = self.by_id[call.device]
            self.has_data.add((w, call.device))
        send_body = body if self.body_key.get(w) != call.body_key else None
        self.body_key[w] = call.body_key
        return call, send_body, data, state

    def _send(self, w: int, method: str, args: tuple) -> None:
        raise NotImplementedError

    def _collect(self) -> list[tuple[int, bool, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _worker_main(conn, spec: TaskSpec) -> None:
    """A worker process: serve requests until the parent closes the pipe."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C hits the group: the parent stops us
    torch.set_num_threads(1)
    host = DeviceHost(spec)
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(host.handle(method, args))
        except (BrokenPipeError, OSError):  # the parent is gone or stopped listening
            return


class ProcessPool(WorkerPool):
    """Workers as local processes (spawned: a clean interpreter, no forked torch state)."""

    def __init__(self, spec: TaskSpec, devices: Sequence[DeviceData], workers: int) -> None:
        super().__init__(spec, devices, workers)
        context = multiprocessing.get_context("spawn")
        self.conns, self.processes = [], []
        try:
            for i in range(workers):
                parent, child = context.Pipe()
                process = context.Process(
                    target=_worker_main, args=(child, spec), name=f"fedmask-worker-{i}", daemon=True
                )
                process.start()
                child.close()
                self.conns.append(parent)
                self.processes.append(process)
        except BaseException:
            self.close()
            raise
        self.pending: set[int] = set()

    def _send(self, w: int, method: str, args: tuple) -> None:
        self.conns[w].send((method, args))
        self.pending.add(w)

    def _collect(self) -> list[tuple[int, bool, Any]]:
        ready = wait([self.conns[w] for w in self.pending], timeout=POLL_S)
        done = []
        for w in sorted(self.pending):
            if self.conns[w] in ready:
                try:
                    ok, value = self.conns[w].recv()
                except (EOFError, OSError):
                    ok, value = False, self._death(w)
                done.append((w, ok, value))
            elif not self.processes[w].is_alive():
                done.append((w, False, self._death(w)))
        self.pending -= {w for w, _, _ in done}
        return done

    def _death(self, w: int) -> str:
        self.processes[w].join(timeout=5)
        return f"worker {w} (pid {self.processes[w].pid}) died with exit code {self.processes[w].exitcode}"

    def close(self) -> None:
        for conn in self.conns:
            conn.close()  # an idle worker sees EOF and returns
        for process in self.processes:
            process.join(timeout=2)
            if process.is_alive():  # busy training: stop it now
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()


class RayPool(WorkerPool):
    """Workers as Ray actors (one CPU each) on the cluster at ``address`` (None: a local instance)."""

    def __init__(
        self, spec: TaskSpec, devices: Sequence[DeviceData], workers: int | None, address: str | None
    ) -> None:
        import ray

        if not ray.is_initialized():
            # A local instance is ours to configure; an existing cluster is joined as it is.
            local = {"include_dashboard": False} if address is None else {}
            ray.init(address=address, logging_level=logging.WARNING, **local)
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        super().__init__(spec, devices, workers)
        self.ray = ray
        actor = ray.remote(num_cpus=1)(RayHost)
        self.actors = [actor.remote(spec) for _ in range(workers)]
        self.refs: dict[Any, int] = {}

    def _send(self, w: int, method: str, args: tuple) -> None:
        self.refs[self.actors[w].handle.remote(method, args)] = w

    def _collect(self) -> list[tuple[int, bool, Any]]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=POLL_S)
        done = []
        for ref in ready:
            w = self.refs.pop(ref)
            try:
                ok, value = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:  # the actor died (node lost, OOM, killed)
                ok, value = False, f"Ray worker {w} failed: {type(exc).__name__}: {exc}"
            done.append((w, ok, value))
        return done

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        self.actors = []


class RayHost(DeviceHost):
    """A ``DeviceHost`` as a Ray actor: one torch thread, like a worker process."""

    def __init__(self, spec: TaskSpec) -> None:
        import torch

        torch.set_num_threads(1)
        super().__init__(spec)

    def run(self, call: Call, body: Any = None, data: DeviceData | None = None, state: bytes | None = None):
        # Ray hands arrays over read-only (shared memory); torch wants writable ones.
        if data is not None:
            data = dataclasses.replace(
                data, **{k: np.array(getattr(data, k)) for k in ("x_train", "y_train", "x_test", "y_test")}
            )
        if isinstance(body, dict):
            body = {name: np.array(value) for name, value in body.items()}
        return super().run(call, body, data, state)


def make_executor(config: Any, spec: TaskSpec, devices: Sequence[DeviceData]):
    """The executor a simulation config asks for (``workers``, ``backend``, ``ray_address``)."""
    if config.backend == "ray":
        return RayPool(spec, devices, config.workers, config.ray_address)
    if (config.workers or 1) > 1:
        return ProcessPool(spec, devices, config.workers)
    return SequentialExecutor(spec, devices)


def stop_ray() -> None:
    """Shut down a Ray instance this process started or joined (no-op without Ray)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
