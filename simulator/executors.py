"""Where the devices of a simulated round run: in this process, in worker processes, or on Ray actors.

An executor runs one kind of device call (``fit``, ``evaluate``, ``finalize``) for a list of devices
(``submit``) and hands back each device's result as soon as it is ready, so the caller
(``simulator.inproc``) encodes and decodes one update while the workers still train the others; it
then counts and aggregates exactly as in a sequential run, in the same device order. Results are
bit-identical to the sequential run because a device's computation depends only on the task, its
data, its own state and the body it receives (its RNGs are seeded from (seed, device, round)),
never on which process runs it or when.

Each worker hosts a set of devices (``DeviceHost``): their client halves, created on first use and kept
between rounds, so a device's state (scores, weights, bases) stays where it trained. The parent plans
each call (``plan``): a device stays on the worker that holds it while the load allows, else it moves to
the least-loaded worker, as its pickled client half (data aside); devices no worker holds yet go, from
a pool, to whichever worker has room first; the biggest devices start first (longest processing time
first). Each worker has
``IN_FLIGHT`` requests queued so it never waits for the parent between devices; a sender thread per
worker keeps a large request from blocking against a large result on the same pipe. Torch runs one
thread per worker. A failure names the device, round and call; Ctrl-C or any
error stops every worker before the run ends.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from fedmask.config import RunError
from fedmask.datasets.federated import DeviceData
from fedmask.strategies import TaskSpec, get_strategy

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often a wait for workers checks that they are all alive
IN_FLIGHT = 2  # requests queued per worker: the next device is there when one finishes
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
        return dict(self.submit(kind, devices, round_no, body))

    def submit(
        self, kind: str, devices: Sequence[str], round_no: int, body: Any
    ) -> Iterator[tuple[str, Any]]:
        """Each device's result, computed when the caller asks for it (in ``devices`` order)."""
        self.device_s = 0.0
        for device in devices:
            call = Call(kind, device, round_no, (kind, round_no))
            started = time.perf_counter()
            try:
                result = self.host.run(call, body)
            except Exception as exc:
                raise RunError(failure(call, f"{type(exc).__name__}: {exc}")) from exc
            self.device_s += time.perf_counter() - started
            yield device, result

    def close(self) -> None:
        pass


def plan(devices: Sequence[str], cost: Callable[[str], float], holder: dict[str, int], workers: int):
    """Which worker runs which held device, and the pool of the others.

    A device stays on the worker that holds it while that worker's load allows, else it moves to the
    least-loaded worker. Devices no worker holds yet form the pool, largest first: each goes to the
    next worker with room in its queue, so a worker that runs fast takes more of them (how long a
    device takes varies with more than its sample count).
    """
    order = sorted(devices, key=lambda d: -cost(d))
    limit = STICKY_SLACK * sum(cost(d) for d in devices) / workers
    load = [0.0] * workers
    assigned: dict[int, list[str]] = {w: [] for w in range(workers)}
    moving = []
    for device in order:
        w = holder.get(device)
        if w is not None and load[w] + cost(device) <= limit:
            assigned[w].append(device)
            load[w] += cost(device)
        elif w is not None:
            moving.append(device)
    for device in moving:
        w = min(range(workers), key=lambda i: (load[i], i))
        assigned[w].append(device)
        load[w] += cost(device)
    return assigned, [d for d in order if d not in holder]


class WorkerPool:
    """Common scheduling over N workers that each serve their requests one at a time, in order.

    Subclasses say how a request is sent (``_send``, never blocking), how answers are collected
    (``_collect``: ``[(worker, ok, value)]``, each worker's in request order, waiting at most ``POLL_S``)
    and how workers are stopped (``close``).
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
        return dict(self.submit(kind, devices, round_no, body))

    def submit(
        self, kind: str, devices: Sequence[str], round_no: int, body: Any
    ) -> Iterator[tuple[str, Any]]:
        """Send the calls now; iterate for ``(device, result)`` in the order the devices finish."""
        batch = self._batch(kind, devices, round_no, body)
        next(batch)  # the first requests are on their way: the caller works while the workers compute
        return batch

    def _batch(self, kind: str, devices: Sequence[str], round_no: int, body: Any):
        cost = self.cost(kind)
        assigned, unheld = plan(devices, cost, self.holder, self.workers)
        pool = deque(unheld)
        moving = {d: self.holder[d] for w, ds in assigned.items() for d in ds if self.holder[d] != w}
        queues: dict[int, deque] = {w: deque() for w in range(self.workers)}
        for device, source in moving.items():
            queues[source].append(("export", device))
        for w, ds in assigned.items():  # devices that move run last: their state comes from another worker
            queues[w].extend(("run", d) for d in ds if d not in moving)
            queues[w].extend(("run", d) for d in ds if d in moving)
        states: dict[str, bytes] = {}
        sent: dict[int, deque[tuple[str, Call]]] = {w: deque() for w in range(self.workers)}  # in order
        key = (kind, round_no)
        self.device_s = 0.0

        def next_request(w: int) -> tuple[str, str] | None:
            """The worker's next planned request; a pool device while a moving one's state travels."""
            todo = queues[w]
            if todo and (todo[0][0] == "export" or todo[0][1] not in moving or todo[0][1] in states):
                return todo.popleft()
            # A pool device waits in a queue only where the least work is queued (never behind a long
            # device while another worker could start it sooner), and the pool's last devices only for
            # a free worker: either way the round could end late while a worker idles.
            if pool and (not sent[w] or (len(pool) >= self.workers and queued(w) <= min(map(queued, sent)))):
                return "run", pool.popleft()
            return None

        def queued(w: int) -> float:
            return sum(cost(call.device) for method, call in sent[w] if method == "run")

        def send_more() -> None:
            for depth in range(IN_FLIGHT):  # breadth first: each worker's first request, then the next
                for w in range(self.workers):
                    if len(sent[w]) > depth or (request := next_request(w)) is None:
                        continue
                    method, device = request
                    call = Call(kind, device, round_no, key)
                    if method == "export":
                        self._send(w, "export", (device,))
                    else:
                        self._send(w, "run", self._run_args(w, call, body, states.pop(device, None)))
                        self.holder[device] = w
                    sent[w].append((method, call))

        send_more()
        yield None
        remaining = len(devices)
        while remaining:
            finished = []
            for w, ok, value in self._collect():
                method, call = sent[w].popleft()  # a worker answers its requests in order
                if not ok:
                    raise RunError(failure(call, value, "handing over" if method == "export" else None))
                value, seconds = value
                if method == "export":
                    states[call.device] = value
                else:
                    finished.append((call.device, value))
                    self.device_s += seconds
            send_more()  # before handing results over: the workers stay busy meanwhile
            remaining -= len(finished)
            yield from finished

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


MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the threshold it adapts (64-bit)


def reuse_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks of up to 32 MB for reuse instead of unmapping them.

    Training allocates and frees megabyte tensors every step. A fresh worker would map and unmap
    each one (paying a page fault per 4 KB) until glibc's adaptive threshold rises; the parent,
    which loaded whole data sets, already runs with it raised. Measured on Fashion-MNIST: a lone
    worker trained a round's devices in 13.0 s of device time without this, 9.1 s with it, the
    sequential run 8.1-8.8 s. Allocation never changes arithmetic, so results stay bit-identical.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixing it also stops it adapting)
        libc.mallopt(-1, 2 * MMAP_THRESHOLD)  # M_TRIM_THRESHOLD, as glibc pairs them itself
    except (OSError, AttributeError, TypeError):  # not glibc: its allocator decides
        logger.debug("mallopt unavailable (%s): worker memory left to the allocator", name)


def _worker_main(conn, spec: TaskSpec) -> None:
    """A worker process: serve requests until the parent closes the pipe."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C hits the group: the parent stops us
    torch.set_num_threads(1)
    reuse_freed_memory()
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
        self.pending = [0] * workers  # requests sent and not answered, per worker
        # One sender thread per worker: this thread only receives, so a worker blocked sending a
        # large result while we send it a large request cannot deadlock the pipe.
        self.outboxes: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(workers)]
        self.senders = [
            threading.Thread(target=self._sender, args=(w,), name=f"fedmask-send-{w}", daemon=True)
            for w in range(workers)
        ]
        for sender in self.senders:
            sender.start()

    def _sender(self, w: int) -> None:
        while (message := self.outboxes[w].get()) is not None:
            try:
                self.conns[w].send(message)
            except (OSError, ValueError):  # the worker died or the pool closed: _collect reports it
                return

    def _send(self, w: int, method: str, args: tuple) -> None:
        self.outboxes[w].put((method, args))
        self.pending[w] += 1

    def _collect(self) -> list[tuple[int, bool, Any]]:
        waiting = [w for w in range(self.workers) if self.pending[w]]
        ready = wait([self.conns[w] for w in waiting], timeout=POLL_S)
        done = []
        for w in waiting:
            if self.conns[w] in ready:
                try:
                    ok, value = self.conns[w].recv()
                except (EOFError, OSError):
                    ok, value = False, self._death(w)
                done.append((w, ok, value))
                self.pending[w] -= 1
            elif not self.processes[w].is_alive():
                done.append((w, False, self._death(w)))
        return done

    def _death(self, w: int) -> str:
        self.processes[w].join(timeout=5)
        return f"worker {w} (pid {self.processes[w].pid}) died with exit code {self.processes[w].exitcode}"

    def close(self) -> None:
        for outbox in getattr(self, "outboxes", []):
            outbox.put(None)  # senders stop after what they are sending
        for sender in getattr(self, "senders", []):
            sender.join(timeout=0.5)  # one blocked on a busy worker ends with the worker, below
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
        self.refs: list[deque] = [deque() for _ in range(workers)]  # per actor, in request order

    def _send(self, w: int, method: str, args: tuple) -> None:
        self.refs[w].append(self.actors[w].handle.remote(method, args))

    def _collect(self) -> list[tuple[int, bool, Any]]:
        heads = {refs[0]: w for w, refs in enumerate(self.refs) if refs}
        ready, _ = self.ray.wait(list(heads), num_returns=1, timeout=POLL_S)
        done = []
        for ref in ready:
            w = heads[ref]
            self.refs[w].popleft()
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
        reuse_freed_memory()
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
