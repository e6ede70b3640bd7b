"""A tiny federated task and a round loop that passes every body through the real codec.

The task: 3-axis "accelerometer" windows of 32 steps whose class decides the frequency of a sine on
one axis, under noise; four devices hold two classes each (pathological non-IID), so both global and
personalized methods have something to learn. The loop encodes every body with
``protocol.tensor_codec`` and msgpack and decodes it again, as both transports do, so a strategy that
passes here only ever sees what would cross the broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from fedmask.datasets.federated import DeviceData, FederatedDataset
from fedmask.protocol.tensor_codec import decode_body, encode_body
from fedmask.strategies import ClientUpdate, TaskSpec, get_strategy
from fedmask.strategies.base import Body, DecodedBody

NUM_CLASSES = 4
WINDOW = 32
DEVICE_CLASSES = ((0, 1), (1, 2), (2, 3), (3, 0))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` threads, then restore: tiny models on a shared 2-core machine run an
    order of magnitude faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_devices(train_per_device: int = 40, test_per_device: int = 20, seed: int = 0) -> list[DeviceData]:
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW, dtype=np.float64) / WINDOW

    def samples(classes: tuple[int, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(np.array(classes), size=n)
        x = rng.normal(0.0, 0.5, size=(n, 3, WINDOW))
        phase = rng.uniform(0, 2 * np.pi, size=n)
        for i, c in enumerate(y):
            x[i, c % 3] += np.sin(2 * np.pi * (c + 1) * t + phase[i])
        return x.astype(np.float32), y.astype(np.int64)

    devices = []
    for k, classes in enumerate(DEVICE_CLASSES):
        x_train, y_train = samples(classes, train_per_device)
        x_test, y_test = samples(classes, test_per_device)
        devices.append(DeviceData(f"dev{k}", x_train, y_train, x_test, y_test, num_classes=NUM_CLASSES))
    return devices


def tiny_federation(train_per_device: int = 40) -> FederatedDataset:
    """The tiny devices as a federation, for the simulator's transports."""
    return FederatedDataset(
        name="tiny",
        partition="pathological",
        num_classes=NUM_CLASSES,
        input_shape=(3, WINDOW),
        input_dtype=np.float32,
        devices=tiny_devices(train_per_device=train_per_device),
    )


def tiny_spec(strategy: str, **hyper) -> TaskSpec:
    return TaskSpec(
        strategy=strategy,
        arch="har_cnn",
        num_classes=NUM_CLASSES,
        seed=3,
        arch_kwargs={"width": 1.0, "window": WINDOW},
        hyper={"local_epochs": 1, "batch_size": 10, **hyper},
    )


def wire(body: Body | None) -> DecodedBody | None:
    """A body as the other half receives it: coded, packed with msgpack, unpacked, decoded."""
    if body is None:
        return None
    return decode_body(msgpack.unpackb(msgpack.packb(encode_body(body), use_bin_type=True), raw=False))


def wire_bytes(body: Body) -> int:
    return len(msgpack.packb(encode_body(body), use_bin_type=True))


def weighted_accuracy(evaluations) -> float:
    total = sum(e.num_samples for e in evaluations)
    return sum(e.accuracy * e.num_samples for e in evaluations) / total


@dataclass
class FederationRun:
    start_accuracy: float
    final_accuracy: float
    uplink_bytes: list[int] = field(default_factory=list)  # per update
    downlink_bytes: list[int] = field(default_factory=list)  # per round announcement
    clients: list = field(default_factory=list)
    server: object = None


def run_federation(spec: TaskSpec, devices: list[DeviceData], rounds: int) -> FederationRun:
    """Every device every round; start accuracy before any training, final accuracy after finalize."""
    strategy = get_strategy(spec.strategy)
    server = strategy.server(spec)
    clients = [strategy.client(spec, d) for d in devices]
    body = server.initial_body()
    start = weighted_accuracy([c.evaluate(wire(body)) for c in clients])
    run = FederationRun(start_accuracy=start, final_accuracy=0.0, clients=clients, server=server)
    expected = server.expected_update()
    for round_no in range(1, rounds + 1):
        global_body = wire(body)
        updates = []
        for device, client in zip(devices, clients):
            fit = client.fit(global_body, round_no)
            received = wire(fit.body)
            if expected is not None:
                assert {k: v.shape for k, v in received.items()} == expected
            run.uplink_bytes.append(wire_bytes(fit.body))
            updates.append(ClientUpdate(device.device_id, received, fit.num_samples))
        body = server.aggregate(updates, round_no)
        run.downlink_bytes.append(wire_bytes(body))
    final_body = wire(body)
    run.final_accuracy = weighted_accuracy([c.finalize(final_body).evaluation for c in clients])
    return run
