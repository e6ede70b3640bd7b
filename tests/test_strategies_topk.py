"""Top-K sparsification: exact error feedback, k selection, and the bits the coded update really costs."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_harness import tiny_devices, tiny_spec, torch_threads, wire, wire_bytes

from fedmask.strategies import ClientUpdate, get_strategy
from fedmask.strategies.topk import encoded_bits, k_for_target_bits, split_update, top_k_selection


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def devices():
    return tiny_devices(train_per_device=40)


def _global_after_one_round(spec, devices):
    strategy = get_strategy("topk")
    server = strategy.server(spec)
    updates = [
        ClientUpdate(d.device_id, wire(strategy.client(spec, d).fit(None, 1).body), len(d.y_train))
        for d in devices
    ]
    return wire(server.aggregate(updates, 1))


def test_top_k_selection_keeps_the_largest_magnitudes():
    rng = np.random.default_rng(0)
    flat = rng.normal(size=1000).astype(np.float32)
    chosen = top_k_selection(flat, 37)
    assert chosen.sum() == 37
    assert np.abs(flat[chosen]).min() >= np.abs(flat[~chosen]).max()
    assert top_k_selection(flat, 0).sum() == 0
    assert top_k_selection(flat, 5000).all()


def test_split_update_is_exact_and_disjoint():
    rng = np.random.default_rng(1)
    accumulated = {
        "a": rng.normal(size=(7, 5)).astype(np.float32),
        "b": rng.normal(size=13).astype(np.float32),
    }
    chosen = top_k_selection(np.concatenate([v.ravel() for v in accumulated.values()]), 9)
    sent, residual = split_update(accumulated, chosen)
    for name, value in accumulated.items():
        assert np.array_equal(sent[name] + residual[name], value)
        assert not np.any((sent[name] != 0) & (residual[name] != 0))
    assert sum(int(np.count_nonzero(s)) for s in sent.values()) == 9


def test_error_feedback_residual_stays_exact_over_rounds(devices):
    """sent + residual == residual_before + (trained - start), bit for bit, in every round."""
    spec = tiny_spec("topk", k=50)
    client = get_strategy("topk").client(spec, devices[0])
    global_body = _global_after_one_round(spec, devices)
    for round_no in (1, 2, 3):
        body = None if round_no == 1 else global_body
        before = {name: r.copy() for name, r in client.residual.items()}
        if body is not None:
            client.model.set_weights(body)
        start = client.model.get_weights()
        fit = client.fit(body, round_no)
        trained = client.model.get_weights()
        sent = wire(fit.body)  # what the server decodes
        nonzero = 0
        for name in start:
            accumulated = before[name] + (trained[name] - start[name])
            assert np.array_equal(sent[name] + client.residual[name], accumulated), name
            nonzero += int(np.count_nonzero(sent[name]))
        assert nonzero <= 50
        assert {c.coding for c in fit.body.values()} == {"topk"}
    # The residual really carries something forward (otherwise the test above would be trivial).
    assert any(np.count_nonzero(r) for r in client.residual.values())


def test_target_bits_per_param_is_met_by_the_encoded_update(devices):
    for target in (0.5, 2.0, 6.0):
        spec = tiny_spec("topk", target_bits_per_param=target)
        client = get_strategy("topk").client(spec, devices[1])
        fit = client.fit(None, 1)
        params = sum(c.array.size for c in fit.body.values())
        measured = wire_bytes(fit.body) * 8 / params
        assert measured == pytest.approx(target, rel=0.05), (target, measured)


def test_k_for_target_bits_grows_with_the_target():
    rng = np.random.default_rng(2)
    accumulated = {"w": rng.normal(size=20_000).astype(np.float32)}
    ks = [k_for_target_bits(accumulated, t, tolerance=0.02, max_steps=8) for t in (0.25, 1.0, 4.0)]
    assert ks[0] < ks[1] < ks[2]
    sent, _ = split_update(accumulated, top_k_selection(accumulated["w"], ks[1]))
    assert encoded_bits(sent) / 20_000 == pytest.approx(1.0, rel=0.02)


def test_fixed_k_takes_precedence_and_bad_settings_are_named(devices):
    client = get_strategy("topk").client(tiny_spec("topk", k=10, target_bits_per_param=4.0), devices[0])
    sent = wire(client.fit(None, 1).body)
    assert sum(int(np.count_nonzero(v)) for v in sent.values()) == 10
    with pytest.raises(ValueError, match="'k'"):
        get_strategy("topk").client(tiny_spec("topk", k=0), devices[0])
    with pytest.raises(ValueError, match="target_bits_per_param"):
        get_strategy("topk").client(tiny_spec("topk", target_bits_per_param=-1), devices[0])
    with pytest.raises(ValueError, match="topk_density"):
        get_strategy("topk").client(tiny_spec("topk", topk_density=1.5), devices[0])


def test_server_adds_the_weighted_mean_of_sparse_updates(devices):
    spec = tiny_spec("topk")
    server = get_strategy("topk").server(spec)
    before = {name: w.copy() for name, w in server.weights.items()}
    rng = np.random.default_rng(3)
    updates = []
    for i, n in enumerate((10, 30)):
        body = {}
        for name, shape in server.expected_update().items():
            value = np.zeros(shape, np.float32)
            value.flat[rng.choice(value.size, size=3, replace=False)] = rng.normal(size=3)
            body[name] = value
        updates.append(ClientUpdate(f"d{i}", body, n))
    out = wire(server.aggregate(updates, 1))
    for name, w in before.items():
        expected = w.astype(np.float64) + 0.25 * updates[0].body[name] + 0.75 * updates[1].body[name]
        np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-6)
