"""Frozen weights, straight-through masks and the four weight modes of fedmask.models."""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmask.models import (
    MaskConfig,
    MaskedConv1d,
    MaskedConv2d,
    MaskedEmbedding,
    MaskedLinear,
    MaskedLSTM,
    WeightMode,
    build_model,
    kaiming_uniform,
    signed_constant,
    sparsity_loss,
    weights_digest,
)
from fedmask.models.layers import SignSTE
from fedmask.models.weights import digest_arrays


def sigmoid_prime(s: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(s.double())
    return p * (1 - p)


def small_har(seed: int = 3, config: MaskConfig | None = None):
    return build_model("har_cnn", seed=seed, num_classes=6, mask_config=config, width=0.25)


def random_mask(model, keep: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(model.num_mask_bits) < keep


# ----- frozen weights ------------------------------------------------------------------------------


def test_signed_constant_follows_the_documented_xof_and_bit_order():
    seed, name, shape, fan_in = 42, "conv1.weight", (3, 5, 7), 35
    w = signed_constant(seed, name, shape, fan_in)
    n = math.prod(shape)
    stream = hashlib.shake_256(f"fedmask-weights/v1/{seed}/{name}".encode()).digest(math.ceil(n / 8))
    expected_signs = [1.0 if (stream[i // 8] >> (i % 8)) & 1 else -1.0 for i in range(n)]
    magnitude = np.float32(math.sqrt(2) / math.sqrt(fan_in))
    assert w.dtype == np.float32 and w.shape == shape
    np.testing.assert_array_equal(w.reshape(-1), np.float32(expected_signs) * magnitude)


def test_signed_constant_depends_on_seed_and_name_only():
    a = signed_constant(1, "fc1.weight", (64, 32), 32)
    np.testing.assert_array_equal(a, signed_constant(1, "fc1.weight", (64, 32), 32))
    assert not np.array_equal(a, signed_constant(2, "fc1.weight", (64, 32), 32))
    assert not np.array_equal(a, signed_constant(1, "fc2.weight", (64, 32), 32))
    # Balanced signs: 2048 fair coin flips stay within 5 sigma of half.
    assert abs((a > 0).mean() - 0.5) < 5 * 0.5 / math.sqrt(a.size)


def test_kaiming_uniform_has_the_kaiming_bound_and_moments():
    fan_in, gain = 50, math.sqrt(2)
    w = kaiming_uniform(9, "fc1.weight", (200, 500), fan_in, gain)
    bound = gain * math.sqrt(3 / fan_in)
    assert w.dtype == np.float32
    assert w.min() >= -bound and w.max() < bound
    np.testing.assert_array_equal(w, kaiming_uniform(9, "fc1.weight", (200, 500), fan_in, gain))
    # Uniform on [-b, b): mean 0, variance b^2/3 = gain^2/fan_in.
    std = bound / math.sqrt(3)
    assert abs(w.mean()) < 5 * std / math.sqrt(w.size)
    assert w.var() == pytest.approx(gain**2 / fan_in, rel=0.02)
    # Its own domain: independent of the signed-constant signs for the same (seed, name).
    signs = signed_constant(9, "fc1.weight", (200, 500), fan_in) > 0
    assert abs(((w > 0) == signs).mean() - 0.5) < 5 * 0.5 / math.sqrt(w.size)


@pytest.mark.parametrize("bad", [(0, 3), (3, -1)])
def test_weight_generators_reject_bad_shapes(bad):
    with pytest.raises(ValueError, match="positive dimensions"):
        signed_constant(1, "x", bad, 3)


def test_digest_covers_names_shapes_and_values():
    w = np.arange(6, dtype=np.float32)
    base = digest_arrays([("a.weight", w.reshape(2, 3))])
    assert base != digest_arrays([("a.weight", w.reshape(3, 2))])
    assert base != digest_arrays([("b.weight", w.reshape(2, 3))])
    changed = w.copy()
    changed[5] = np.nextafter(changed[5], np.float32(10))
    assert base != digest_arrays([("a.weight", changed.reshape(2, 3))])


DIGEST_SCRIPT = """
from fedmask.models import build_model, weights_digest
for seed in (5, 6):
    print(weights_digest(build_model("char_lstm_small", seed=seed, num_classes=40)))
"""


def test_digest_is_identical_in_another_process_and_depends_on_the_seed():
    out = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT], capture_output=True, text=True, check=True)
    there_5, there_6 = out.stdout.split()
    here = weights_digest(build_model("char_lstm_small", seed=5, num_classes=40))
    assert there_5 == here
    assert there_6 != here
    assert len(here) == 64 and int(here, 16) >= 0


def test_digest_ignores_training_state():
    model = small_har()
    before = weights_digest(model)
    model.set_mask(random_mask(model, 0.3, seed=0))
    model.set_mode(WeightMode.DENSE)
    assert weights_digest(model) == before


# ----- straight-through estimator ------------------------------------------------------------------


def _finite_difference(f, point: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(point)
    flat, out = point.reshape(-1), grad.reshape(-1)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        out[i] = (f(plus.view_as(point)) - f(minus.view_as(point))) / (2 * eps)
    return grad


def test_straight_through_gradient_matches_finite_difference_on_the_mask():
    torch.manual_seed(0)
    layer = MaskedLinear(4, 3, name="fc", seed=1)
    with torch.no_grad():
        layer.scores["weight"].copy_(torch.randn(3, 4) * 2)
    x, r = torch.randn(5, 4), torch.randn(5, 3)

    loss = (torch.tanh(layer(x)) * r).sum()
    loss.backward()

    frozen, scores = layer.frozen("weight").double(), layer.scores["weight"].detach()
    mask = (torch.sigmoid(scores) > 0.5).double()
    assert 0 < mask.sum() < mask.numel()  # both kept and pruned weights are checked

    def loss_of_mask(m: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(F.linear(x.double(), frozen * m)) * r.double()).sum()

    d_loss_d_mask = _finite_difference(loss_of_mask, mask)
    expected = d_loss_d_mask * sigmoid_prime(scores)
    torch.testing.assert_close(layer.scores["weight"].grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_unit_straight_through_gradient_sums_over_the_unit():
    torch.manual_seed(1)
    config = MaskConfig(granularity="unit")
    layer = MaskedConv1d(2, 4, 3, padding=1, name="conv", seed=2, config=config)
    with torch.no_grad():
        layer.scores["weight"].copy_(torch.tensor([1.5, -0.7, 0.3, -2.0]))
    x, r = torch.randn(3, 2, 6), torch.randn(3, 4, 6)
    (torch.tanh(layer(x)) * r).sum().backward()

    frozen, scores = layer.frozen("weight").double(), layer.scores["weight"].detach()
    unit_mask = (torch.sigmoid(scores) > 0.5).double()

    def loss_of_unit_mask(m: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(F.conv1d(x.double(), frozen * m.view(-1, 1, 1), padding=1)) * r.double()).sum()

    expected = _finite_difference(loss_of_unit_mask, unit_mask) * sigmoid_prime(scores)
    torch.testing.assert_close(layer.scores["weight"].grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_sampled_straight_through_uses_the_sampled_mask():
    config = MaskConfig(binarization="sampled")
    layer = MaskedLinear(6, 5, name="fc", seed=3, config=config)
    torch.manual_seed(2)
    with torch.no_grad():
        layer.scores["weight"].copy_(torch.randn(5, 6))
    layer.generator = torch.Generator().manual_seed(77)
    x = torch.randn(4, 6)
    layer(x).sum().backward()

    scores = layer.scores["weight"].detach()
    sampled = torch.bernoulli(torch.sigmoid(scores), generator=torch.Generator().manual_seed(77)).double()
    frozen = layer.frozen("weight").double()
    d_loss_d_mask = _finite_difference(lambda m: F.linear(x.double(), frozen * m).sum(), sampled)
    expected = d_loss_d_mask * sigmoid_prime(scores)
    torch.testing.assert_close(layer.scores["weight"].grad.double(), expected, rtol=1e-4, atol=1e-6)


# ----- binarization ---------------------------------------------------------------------------------


def test_sampled_binarization_is_reproducible_and_differs_from_deterministic():
    config = MaskConfig(binarization="sampled")
    model = small_har(config=config)
    x = torch.randn(8, 3, 128, generator=torch.Generator().manual_seed(0))
    model.train()

    def sampled_output(seed: int) -> torch.Tensor:
        model.set_sampling_generator(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return model(x)

    first, again, other = sampled_output(10), sampled_output(10), sampled_output(11)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    model.eval()
    with torch.no_grad():
        deterministic = model(x)
    assert not torch.equal(first, deterministic)
    torch.testing.assert_close(deterministic, model.to_plain()(x), rtol=0, atol=1e-5)


def test_sampled_keep_rate_follows_the_probabilities():
    config = MaskConfig(binarization="sampled", score_init=1.0)
    layer = MaskedLinear(200, 100, name="fc", seed=4, config=config)
    layer.generator = torch.Generator().manual_seed(5)
    kept = (layer.weight("weight") != 0).double().mean().item()
    p = 1 / (1 + math.exp(-1.0))
    assert kept == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / 20000))


# ----- unit granularity ---------------------------------------------------------------------------


def _set_unit_scores(layer, tensor: str, keep: list[bool]) -> None:
    with torch.no_grad():
        layer.scores[tensor].copy_(torch.tensor([1.0 if k else -1.0 for k in keep]))


def test_unit_masks_expand_over_output_units():
    config = MaskConfig(granularity="unit")
    keep = [True, False, True, False, True]

    linear = MaskedLinear(7, 5, name="fc", seed=1, config=config)
    conv = MaskedConv2d(3, 5, 3, name="conv", seed=1, config=config)
    embed = MaskedEmbedding(11, 5, name="embed", seed=1, config=config)
    for layer, unit_axis in ((linear, 0), (conv, 0), (embed, 1)):
        assert layer.scores["weight"].shape == (5,)
        _set_unit_scores(layer, "weight", keep)
        weight = layer.effective_weights()["weight"]
        frozen = layer.frozen("weight")
        for unit, kept in enumerate(keep):
            got, want = weight.select(unit_axis, unit), frozen.select(unit_axis, unit)
            assert torch.equal(got, want if kept else torch.zeros_like(want)), (layer.name, unit)


def test_lstm_unit_mask_covers_all_four_gates_and_silences_the_unit():
    hidden = 4
    lstm = MaskedLSTM(3, hidden, 1, name="lstm", seed=2, config=MaskConfig(granularity="unit"))
    keep = [True, False, True, True]
    for tensor in ("weight_ih_l0", "weight_hh_l0"):
        assert lstm.scores[tensor].shape == (hidden,)
        _set_unit_scores(lstm, tensor, keep)
    weights = lstm.effective_weights()
    for tensor, weight in weights.items():
        for gate in range(4):
            assert torch.equal(weight[gate * hidden + 1], torch.zeros_like(weight[0])), (tensor, gate)
            assert torch.equal(weight[gate * hidden], lstm.frozen(tensor)[gate * hidden])
    lstm.eval()
    out = lstm(torch.randn(2, 6, 3))
    assert torch.equal(out[:, 1], torch.zeros(2))
    assert (out[:, 0] != 0).all()


def test_unit_layout_counts_units():
    model = build_model(
        "char_lstm_small", seed=1, num_classes=30, mask_config=MaskConfig(granularity="unit"), hidden_size=16
    )
    layout = dict(model.mask_layout())
    assert layout["embed.weight"] == 8
    assert layout["lstm.weight_ih_l0"] == layout["lstm.weight_hh_l1"] == 16
    assert layout["fc.weight"] == 30
    assert model.num_mask_bits == sum(layout.values())


# ----- masks, scores and weights as vectors -----------------------------------------------------


def test_set_mask_get_mask_round_trip():
    model = small_har()
    mask = random_mask(model, 0.4, seed=1)
    model.set_mask(mask)
    np.testing.assert_array_equal(model.get_mask(), mask)
    scores = model.get_scores()
    np.testing.assert_array_equal(np.abs(scores), np.float32(model.mask_config.score_init))
    np.testing.assert_array_equal(model.probabilities() > 0.5, mask)
    assert model.density() == pytest.approx(mask.mean())


def test_set_mask_rejects_bad_input():
    model = small_har()
    with pytest.raises(ValueError, match=f"{model.num_mask_bits} entries"):
        model.set_mask(np.ones(model.num_mask_bits - 1, dtype=bool))
    with pytest.raises(TypeError, match="bool"):
        model.set_mask(np.ones(model.num_mask_bits, dtype=np.float32))
    with pytest.raises(ValueError, match="finite"):
        model.set_scores(np.full(model.num_mask_bits, np.nan, dtype=np.float32))


def test_set_scores_round_trip_follows_the_layout():
    model = small_har()
    scores = np.random.default_rng(2).normal(size=model.num_mask_bits).astype(np.float32)
    model.set_scores(scores)
    np.testing.assert_array_equal(model.get_scores(), scores)
    offset = 0
    for name, bits in model.mask_layout():
        layer_name, tensor = name.split(".")
        layer = dict(model.layers())[layer_name]
        np.testing.assert_array_equal(
            layer.scores[tensor].detach().numpy().reshape(-1), scores[offset : offset + bits]
        )
        offset += bits
    assert offset == model.num_mask_bits
    np.testing.assert_allclose(model.probabilities(), 1 / (1 + np.exp(-scores)), rtol=1e-6)


def test_get_weights_set_weights_in_dense_mode():
    model = small_har()
    model.set_mode(WeightMode.DENSE)
    weights = model.get_weights()
    assert set(weights) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    layer = dict(model.layers())["fc1"]
    spec = layer.specs[0]
    np.testing.assert_array_equal(
        weights["fc1.weight"], kaiming_uniform(model.seed, "fc1.weight", spec.shape, spec.fan_in)
    )
    doubled = {k: 2 * v for k, v in weights.items()}
    model.set_weights(doubled)
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(value, doubled[key])
    with pytest.raises(ValueError, match=re.escape("missing keys ['fc2.weight']")):
        model.set_weights({k: v for k, v in weights.items() if k != "fc2.weight"})
    with pytest.raises(ValueError, match=re.escape("fc1.weight: expected shape")):
        model.set_weights({**weights, "fc1.weight": weights["fc1.weight"].T})


def test_masked_layer_selection_leaves_other_layers_frozen_and_dense():
    model = small_har(config=MaskConfig(masked_layers=("fc*",)))
    assert [name for name, _ in model.mask_layout()] == ["fc1.weight", "fc2.weight"]
    conv1 = dict(model.layers())["conv1"]
    assert not conv1.masked and len(conv1.scores) == 0
    model.set_mask(np.zeros(model.num_mask_bits, dtype=bool))
    assert torch.equal(conv1.effective_weights()["weight"], conv1.frozen("weight"))
    densities = model.layer_densities()
    assert densities["conv1.weight"] == 1.0 and densities["fc1.weight"] == 0.0
    with pytest.raises(ValueError, match="pattern 'head\\*' matches no layer"):
        small_har(config=MaskConfig(masked_layers=("fc*", "head*")))


def test_mask_config_validation_names_the_field():
    with pytest.raises(ValueError, match="granularity"):
        MaskConfig(granularity="channel")
    with pytest.raises(ValueError, match="score_init"):
        MaskConfig(score_init=0.0)
    with pytest.raises(ValueError, match="masked_layers"):
        MaskConfig(masked_layers="fc*")
    assert MaskConfig(masked_layers=["fc*"]).masked_layers == ("fc*",)


def test_frozen_weights_are_not_in_the_state_dict():
    model = small_har()
    keys = set(model.state_dict())
    assert keys == {f"{name}.scores.weight" for name, _ in model.layers()}


# ----- modes ----------------------------------------------------------------------------------------


def test_finetune_keeps_pruned_weights_exactly_zero():
    torch.manual_seed(0)
    model = small_har()
    model.set_mask(random_mask(model, 0.5, seed=3))
    model.start_finetune()
    initial = {k: v.copy() for k, v in model.get_weights().items()}
    masks = {name: layer.full_mask(layer.specs[0]).numpy() for name, layer in model.layers()}
    for name, layer in model.layers():
        expected = (layer.frozen("weight") * layer.full_mask(layer.specs[0])).numpy()
        np.testing.assert_array_equal(initial[f"{name}.weight"], expected)

    x, y = torch.randn(16, 3, 128), torch.randint(0, 6, (16,))
    optimizers = [
        torch.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
        torch.optim.Adam(model.trainable_parameters(), lr=1e-2, weight_decay=1e-3),
    ]
    for optimizer in optimizers:
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            for name, layer in model.layers():
                grad = layer.weights["weight"].grad.numpy()
                assert (grad[masks[name] == 0] == 0).all(), name
            optimizer.step()

    for key, value in model.get_weights().items():
        pruned = masks[key.split(".")[0]] == 0
        assert (value[pruned] == 0).all(), key
        assert not np.array_equal(value[~pruned], initial[key][~pruned]), key
    plain_state = model.to_plain().state_dict()
    for key in initial:
        assert (plain_state[key].numpy()[masks[key.split(".")[0]] == 0] == 0).all()
    assert model.density() == pytest.approx(np.mean(np.concatenate([m.ravel() for m in masks.values()])))


def test_finetune_fixes_the_mask_and_mask_mode_returns_to_the_scores():
    model = small_har()
    model.set_mask(random_mask(model, 0.5, seed=4))
    x = torch.randn(4, 3, 128)
    model.eval()
    before = model(x)
    model.start_finetune()
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="fixed while fine-tuning"):
        model.set_mask(np.ones(model.num_mask_bits, dtype=bool))
    with pytest.raises(RuntimeError, match="expected MASK mode"):
        model.start_finetune()
    model.set_mode(WeightMode.MASK)
    assert all(p.requires_grad for p in model.trainable_parameters())
    assert {id(p) for p in model.trainable_parameters()} == {
        id(layer.scores["weight"]) for _, layer in model.layers()
    }
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_binary_mode_uses_scaled_signs_and_clips_latent_weights():
    layer = MaskedLinear(8, 3, name="fc", seed=5)
    layer.set_mode(WeightMode.BINARY)
    latent = layer.weights["weight"]
    assert latent.abs().max() <= 1
    with torch.no_grad():
        latent.mul_(40)  # as a large optimizer step would
    scale = np.float32(math.sqrt(2) / math.sqrt(8))
    weight = layer.weight("weight")
    assert latent.abs().max().item() == 1.0
    expected = torch.where(latent.detach() >= 0, 1.0, -1.0) * float(scale)
    assert torch.equal(weight.detach(), expected)


def test_sign_ste_passes_gradient_only_inside_the_clip_range():
    latent = torch.tensor([-1.5, -1.0, -0.2, 0.0, 0.7, 1.0, 2.0], requires_grad=True)
    out = SignSTE.apply(latent)
    assert out.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    out.backward(torch.arange(1.0, 8.0))
    assert latent.grad.tolist() == [0, 2, 3, 4, 5, 6, 0]


def test_same_seed_gives_identical_masks_after_the_same_training():
    def train(binarization: str) -> tuple[np.ndarray, np.ndarray]:
        torch.manual_seed(123)
        model = small_har(seed=9, config=MaskConfig(binarization=binarization))
        model.set_sampling_generator(torch.Generator().manual_seed(7))
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.5)
        for _ in range(4):
            x, y = torch.randn(16, 3, 128), torch.randint(0, 6, (16,))
            optimizer.zero_grad()
            (F.cross_entropy(model(x), y) + sparsity_loss(model, 1.0)).backward()
            optimizer.step()
        return model.get_mask(), model.get_scores()

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for binarization in ("deterministic", "sampled"):
            mask_a, scores_a = train(binarization)
            mask_b, scores_b = train(binarization)
            assert not mask_a.all(), "training should have pruned something"
            np.testing.assert_array_equal(mask_a, mask_b)
            np.testing.assert_array_equal(scores_a, scores_b)
    finally:
        torch.use_deterministic_algorithms(previous)
