"""FedPM: Beta-posterior aggregation with resets, sampled masks, one global probability mask."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_harness import tiny_devices, tiny_spec, torch_threads, wire

from fedmask.strategies import ClientUpdate, get_strategy
from fedmask.strategies.fedpm import BetaPosterior, logit


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def devices():
    return tiny_devices(train_per_device=40)


def random_masks(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(size) < rng.uniform(0.2, 0.8) for _ in range(count)]


def test_flat_prior_posterior_mode_is_the_mean_of_masks():
    masks = random_masks(5, 1000)
    posterior = BetaPosterior(1000, prior=1.0)
    for m in masks:
        posterior.observe(m)
    np.testing.assert_allclose(posterior.mode(), np.mean(masks, axis=0), atol=1e-12)
    posterior.reset()
    np.testing.assert_array_equal(posterior.mode(), np.full(1000, 0.5))


def test_server_accumulates_until_the_reset(devices):
    spec = tiny_spec("fedpm", reset_every=2)
    server = get_strategy("fedpm").server(spec)
    size = server.expected_update()["mask"][0]
    rounds = [random_masks(3, size, seed) for seed in (1, 2, 3)]
    probs = []
    for round_no, masks in enumerate(rounds, start=1):
        body = server.aggregate(
            [ClientUpdate(f"d{i}", {"mask": m}, 10) for i, m in enumerate(masks)], round_no
        )
        assert body["probs"].coding == "f16"
        probs.append(wire(body)["probs"])
    half = 2.0**-11  # f16 resolution in [0.5, 1]
    np.testing.assert_allclose(probs[0], np.mean(rounds[0], axis=0), atol=half)
    np.testing.assert_allclose(probs[1], np.mean(rounds[0] + rounds[1], axis=0), atol=half)
    np.testing.assert_allclose(probs[2], np.mean(rounds[2], axis=0), atol=half)  # reset after 2 rounds


def test_devices_start_from_the_global_probabilities_and_upload_sampled_bits(devices):
    spec = tiny_spec("fedpm")  # the run's mask config says deterministic; FedPM samples anyway
    strategy = get_strategy("fedpm")
    client = strategy.client(spec, devices[0])
    assert client.model.mask_config.binarization == "sampled"
    size = client.model.num_mask_bits
    probs = np.random.default_rng(4).uniform(0.0, 1.0, size).astype(np.float32)
    probs[:10] = (0.0, 1.0, 0.5, 0.25, 0.75, 0.0, 1.0, 0.001, 0.999, 0.3)
    client.evaluate({"probs": probs})
    clipped = np.clip(probs, 0.01, 0.99)
    np.testing.assert_allclose(client.model.probabilities(), clipped, rtol=1e-5)
    np.testing.assert_allclose(client.model.get_scores(), logit(probs, 0.01), rtol=1e-5)
    fit = client.fit({"probs": probs}, 2)
    assert fit.body["mask"].coding == "bits"
    mask = fit.body["mask"].array
    assert mask.dtype == np.bool_ and mask.shape == (size,)
    # A sample, not a threshold: some weights with p < 1/2 are kept and some with p > 1/2 dropped.
    trained = client.model.probabilities()
    assert mask[trained < 0.5].any() and not mask[trained > 0.5].all()
    assert abs(mask.mean() - trained.mean()) < 4 * np.sqrt(0.25 / size)


def test_evaluation_uses_the_one_global_model(devices):
    spec = tiny_spec("fedpm")
    strategy = get_strategy("fedpm")
    clients = [strategy.client(spec, d) for d in devices]
    updates = [ClientUpdate(d.device_id, wire(c.fit(None, 1).body), 40) for d, c in zip(devices, clients)]
    probs = wire(strategy.server(spec).aggregate(updates, 1))
    masks = [c.finalize(probs).mask for c in clients]
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
    np.testing.assert_array_equal(masks[0], probs["probs"] > 0.5)


def test_bad_settings_are_named(devices):
    with pytest.raises(ValueError, match="reset_every"):
        get_strategy("fedpm").server(tiny_spec("fedpm", reset_every=0))
    with pytest.raises(ValueError, match="prob_clip"):
        get_strategy("fedpm").client(tiny_spec("fedpm", prob_clip=0.7), devices[0])
    with pytest.raises(ValueError, match="prior"):
        get_strategy("fedpm").server(tiny_spec("fedpm", prior=0.5))
