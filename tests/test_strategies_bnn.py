"""BNN-FedAvg: one bit per weight up, the weighted mean of signs down (half precision)."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_harness import tiny_devices, tiny_spec, torch_threads, wire

from fedmask.protocol.tensor_codec import pack_bits
from fedmask.strategies import ClientUpdate, get_strategy
from fedmask.strategies.bnn import mean_of_signs


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def devices():
    return tiny_devices(train_per_device=40)


def test_update_is_exactly_one_bit_per_weight_before_coding(devices):
    spec = tiny_spec("bnn")
    client = get_strategy("bnn").client(spec, devices[0])
    fit = client.fit(None, 1)
    latent = client.model.get_weights()
    assert set(fit.body) == set(latent)
    for name, coded in fit.body.items():
        assert coded.coding == "bits"
        assert coded.array.dtype == np.bool_
        assert coded.array.shape == latent[name].shape
        # Bit-packed, before zlib: exactly ceil(n / 8) bytes for n weights.
        assert len(pack_bits(coded.array)) == (latent[name].size + 7) // 8
        # The bits are the signs of the trained latent weights, with sign(0) = +1.
        assert np.array_equal(coded.array, latent[name] >= 0)
    assert sum(c.array.size for c in fit.body.values()) == client.model.num_parameters


def test_server_sends_the_weighted_mean_of_signs_in_half_precision(devices):
    spec = tiny_spec("bnn")
    server = get_strategy("bnn").server(spec)
    rng = np.random.default_rng(0)
    shapes = server.expected_update()
    signs = [{name: rng.random(shape) < 0.5 for name, shape in shapes.items()} for _ in range(3)]
    samples = (10, 20, 70)
    updates = [ClientUpdate(f"d{i}", s, n) for i, (s, n) in enumerate(zip(signs, samples))]
    body = server.aggregate(updates, 1)
    assert {c.coding for c in body.values()} == {"f16"}
    received = wire(body)
    for name in shapes:
        pm = [2.0 * s[name].astype(np.float64) - 1.0 for s in signs]
        expected = (10 * pm[0] + 20 * pm[1] + 70 * pm[2]) / 100
        np.testing.assert_allclose(received[name], expected, atol=2.0**-11)
        # Half precision never flips a sign: the majority survives the downlink.
        assert np.array_equal(received[name] >= 0, expected >= 0)


def test_device_starts_from_the_global_latent_weights(devices):
    spec = tiny_spec("bnn")
    strategy = get_strategy("bnn")
    updates = [
        ClientUpdate(d.device_id, wire(strategy.client(spec, d).fit(None, 1).body), 1) for d in devices
    ]
    latent = wire(strategy.server(spec).aggregate(updates, 1))
    client = strategy.client(spec, devices[2])
    client.evaluate(latent)
    for name, value in client.model.get_weights().items():
        np.testing.assert_array_equal(value, latent[name])


def test_mean_of_signs_needs_an_update():
    with pytest.raises(ValueError, match="at least one update"):
        mean_of_signs([], [])
