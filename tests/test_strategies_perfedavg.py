"""Per-FedAvg: the first-order and Hessian-free meta steps against autograd, and adaptation before testing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from strategy_harness import tiny_devices, tiny_spec, torch_threads, wire
from torch import nn

from fedmask.strategies import ClientUpdate, get_strategy
from fedmask.strategies.perfedavg import batch_groups, hessian_vector, meta_step


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def smooth_model() -> nn.Module:
    """A tanh network: smooth, so a finite difference of gradients must match the exact Hessian."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(96, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False))


def batches(n: int = 3):
    gen = torch.Generator().manual_seed(1)
    return tuple(
        (torch.randn(12, 3, 32, generator=gen), torch.randint(0, 4, (12,), generator=gen)) for _ in range(n)
    )


def loss_grad(model, params, batch, create_graph=False):
    x, y = batch
    return torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=create_graph)


def exact_hvp(model, params, batch, vector):
    grads = loss_grad(model, params, batch, create_graph=True)
    return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector)), params)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_hessian_vector_matches_autograd_and_restores_the_weights():
    model = smooth_model()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    vector = [torch.randn_like(p) for p in params]
    batch = batches(1)[0]
    estimate = flat(hessian_vector(model, params, batch, vector, delta=1e-2))
    exact = flat(exact_hvp(model, params, batch, vector))
    assert float((estimate - exact).norm() / exact.norm()) < 1e-3
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def _expected_step(alpha, beta, d, d1, d2=None):
    """w - beta * (I - alpha H(w; D'')) grad f(w - alpha grad f(w; D); D'), from autograd."""
    model = smooth_model()
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    inner = loss_grad(model, params, d)
    with torch.no_grad():
        for p, g in zip(params, inner):
            p.sub_(alpha * g)
    outer = [g.detach() for g in loss_grad(model, params, d1)]
    with torch.no_grad():
        for p, s in zip(params, w):
            p.copy_(s)
    if d2 is not None:
        outer = [o - alpha * h for o, h in zip(outer, exact_hvp(model, params, d2, outer))]
    return flat([s - beta * o for s, o in zip(w, outer)])


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_meta_step_follows_the_per_fedavg_update(variant):
    alpha, beta = 0.5, 0.3
    d, d1, d2 = batches(3)
    model = smooth_model()
    params = list(model.parameters())
    start = flat(params).detach().clone()
    groups = (d, d1) if variant == "fo" else (d, d1, d2)
    meta_step(model, params, groups, alpha=alpha, beta=beta, variant=variant, delta=1e-2)
    got = flat(params).detach()
    expected = _expected_step(alpha, beta, d, d1, d2 if variant == "hf" else None)
    assert float((got - expected).norm() / (expected - start).norm()) < 1e-3
    if variant == "hf":
        # The Hessian term is really there: HF moves differently from FO on the same batches.
        fo = _expected_step(alpha, beta, d, d1)
        assert float((got - fo).norm()) > 100 * float((got - expected).norm())


def test_batch_groups_cover_an_epoch_in_groups():
    x, y = torch.arange(50).float().reshape(50, 1), torch.arange(50)
    groups = list(batch_groups(x, y, batch_size=8, group=3, generator=torch.Generator().manual_seed(0)))
    assert all(len(g) == 3 for g in groups)
    assert len(groups) == 3  # 7 batches of up to 8 -> ceil(7 / 3) groups, the last wrapping around
    seen = torch.cat([b[1] for g in groups for b in g])
    assert set(seen.tolist()) == set(range(50))


@pytest.mark.parametrize("name", ["perfedavg", "perfedavg_hf"])
def test_adaptation_is_for_testing_only(name):
    devices = tiny_devices(train_per_device=40)
    strategy = get_strategy(name)
    spec = tiny_spec(name)
    updates = [
        ClientUpdate(d.device_id, wire(strategy.client(spec, d).fit(None, 1).body), 40) for d in devices
    ]
    global_body = wire(strategy.server(spec).aggregate(updates, 1))
    client = strategy.client(spec, devices[0])
    client.evaluate(global_body)
    # evaluate() adapts a copy: the device keeps the meta-model it trains from.
    for key, value in client.model.get_weights().items():
        np.testing.assert_array_equal(value, global_body[key])
    final = client.finalize(global_body)
    moved = any(not np.array_equal(v, global_body[k]) for k, v in final.model.get_weights().items())
    assert moved, "the final model must be the globally trained model after one local step"
    unadapted = strategy.client(tiny_spec(name, adapt_steps=0), devices[0]).finalize(global_body)
    for key, value in unadapted.model.get_weights().items():
        np.testing.assert_array_equal(value, global_body[key])
