"""Every zoo model: shapes, plain-model equivalence, a backward pass per mode; and the sparsity loss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from fedmask.models import (
    ARCHITECTURES,
    LastStepLSTM,
    MaskConfig,
    WeightMode,
    build_model,
    layer_lambdas,
    sparsity_loss,
    weights_digest,
)

# CPU-friendly variants; the full-size models are checked for their size only.
SMALL = {"femnist_cnn": {"width": 0.25}, "conv4": {"width": 0.25}, "conv6": {"width": 0.25}}
PLAIN_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Embedding,
    LastStepLSTM,
    nn.LSTM,
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
)


def num_classes_for(arch: str) -> int:
    return 37 if ARCHITECTURES[arch].input_dtype == "int64" else 7


def make(arch: str, config: MaskConfig | None = None, seed: int = 1):
    return build_model(
        arch, seed=seed, num_classes=num_classes_for(arch), mask_config=config, **SMALL.get(arch, {})
    )


def example_input(arch: str, batch: int = 3) -> torch.Tensor:
    entry = ARCHITECTURES[arch]
    generator = torch.Generator().manual_seed(0)
    if entry.input_dtype == "int64":
        return torch.randint(0, num_classes_for(arch), (batch, *entry.input_shape), generator=generator)
    return torch.randn(batch, *entry.input_shape, generator=generator)


def randomize(model, mode: WeightMode) -> None:
    """Put the model in ``mode`` with a nontrivial mask and weights."""
    model.set_mode(WeightMode.MASK)
    rng = np.random.default_rng(5)
    model.set_mask(rng.random(model.num_mask_bits) < 0.6)
    if mode is WeightMode.FINETUNE:
        model.start_finetune()
    else:
        model.set_mode(mode)
    if mode is not WeightMode.MASK:
        weights = model.get_weights()
        model.set_weights(
            {k: v * rng.uniform(0.5, 1.5, v.shape).astype(np.float32) for k, v in weights.items()}
        )


ARCHS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape(arch):
    model = make(arch)
    out = model(example_input(arch, batch=3))
    assert out.shape == (3, num_classes_for(arch))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", list(WeightMode), ids=lambda m: m.value)
@pytest.mark.parametrize("arch", ARCHS)
def test_to_plain_matches_the_network_in_eval(arch, mode):
    model = make(arch)
    randomize(model, mode)
    model.eval()
    x = example_input(arch)
    plain = model.to_plain()
    for module in plain.modules():
        assert module is plain or isinstance(module, PLAIN_TYPES), type(module)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-5)
    masked_keys = {name for name, _ in model.mask_layout()}
    state = plain.state_dict()
    for key in masked_keys:
        assert key in state or key.replace("lstm.", "lstm.lstm.") in state


@pytest.mark.parametrize("arch", ARCHS)
def test_to_plain_with_unit_masks_and_sampling(arch):
    model = make(arch, MaskConfig(granularity="unit", binarization="sampled"))
    model.set_mask(np.random.default_rng(1).random(model.num_mask_bits) < 0.7)
    model.eval()
    x = example_input(arch)
    with torch.no_grad():
        torch.testing.assert_close(model.to_plain()(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", list(WeightMode), ids=lambda m: m.value)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_mode_trains(arch, mode):
    model = make(arch)
    randomize(model, mode)
    model.train()
    params = model.trainable_parameters()
    assert params, "every mode trains something"
    loss = nn.functional.cross_entropy(model(example_input(arch)), torch.arange(3) % num_classes_for(arch))
    loss.backward()
    for param in params:
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0
    digest = weights_digest(model)
    torch.optim.SGD(params, lr=0.1).step()
    assert weights_digest(model) == digest, "training must never touch the frozen weights"


def test_layer_order_is_forward_order():
    model = build_model("conv6", seed=1, num_classes=10, width=0.25)
    assert [name for name, _ in model.layers()] == [f"conv{i}" for i in range(1, 7)] + ["fc1", "fc2", "fc3"]
    lstm = build_model("char_lstm", seed=1, num_classes=80)
    assert [name for name, _ in lstm.mask_layout()] == [
        "embed.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "fc.weight",
    ]


def test_model_sizes_follow_their_definitions():
    har = build_model("har_cnn", seed=0, num_classes=14)
    assert 10_000 < har.num_parameters < 100_000
    assert har.num_parameters == 3 * 32 * 5 + 32 * 64 * 5 + 64 * 8 * 128 + 128 * 14

    femnist = build_model("femnist_cnn", seed=0, num_classes=62)
    assert femnist.num_parameters == 1 * 32 * 25 + 32 * 64 * 25 + 64 * 7 * 7 * 2048 + 2048 * 62
    assert (
        build_model("femnist_cnn", seed=0, num_classes=62, width=0.25).num_parameters
        < femnist.num_parameters / 10
    )

    conv4 = build_model("conv4", seed=0, num_classes=10)
    conv4_convs = 3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9
    assert conv4.num_parameters == conv4_convs + 128 * 8 * 8 * 256 + 256 * 256 + 256 * 10

    lstm = build_model("char_lstm", seed=0, num_classes=80)
    assert lstm.num_parameters == 80 * 8 + 4 * 256 * (8 + 256) + 4 * 256 * (256 + 256) + 256 * 80
    small = build_model("char_lstm_small", seed=0, num_classes=80)
    assert small.num_parameters < lstm.num_parameters / 10
    assert har.num_mask_bits == har.num_parameters


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet'.*har_cnn"):
        build_model("resnet", seed=1, num_classes=10)
    with pytest.raises(TypeError, match=r"har_cnn: .*depth.*options are .*width"):
        build_model("har_cnn", seed=1, num_classes=10, depth=3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("conv4", seed=1, num_classes=1)
    with pytest.raises(ValueError, match="width"):
        build_model("conv4", seed=1, num_classes=10, width=0)


def test_architectures_are_described():
    for name, entry in ARCHITECTURES.items():
        assert entry.description and entry.input_dtype in ("float32", "int64"), name
        assert make(name).arch == name


# ----- sparsity loss --------------------------------------------------------------------------------


def test_lambdas_grow_with_depth():
    model = make("conv4")
    lambdas = layer_lambdas(model, base_lambda=1e-3, growth=2.0)
    names = [name for name, _ in model.layers()]
    assert list(lambdas) == names
    values = [lambdas[n] for n in names]
    assert values[0] == 1e-3
    assert all(b == pytest.approx(2 * a) for a, b in itertools.pairwise(values))
    flat = layer_lambdas(model, base_lambda=1e-3, growth=1.0)
    assert set(flat.values()) == {1e-3}


def test_lambdas_keep_depth_when_only_some_layers_are_masked():
    model = make("har_cnn", MaskConfig(masked_layers=("fc*",)))
    assert layer_lambdas(model, 1.0, 3.0) == {"fc1": 9.0, "fc2": 27.0}


def test_sparsity_loss_is_the_weighted_mean_keep_probability():
    model = make("har_cnn")
    rng = np.random.default_rng(0)
    model.set_scores(rng.normal(size=model.num_mask_bits).astype(np.float32))
    probs, offset, expected = model.probabilities(), 0, 0.0
    lambdas = layer_lambdas(model, 0.01, 2.0)
    for name, bits in model.mask_layout():
        expected += lambdas[name.split(".")[0]] * probs[offset : offset + bits].mean()
        offset += bits
    assert sparsity_loss(model, 0.01, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_sparsity_loss_decreases_when_the_deep_layer_scores_decrease():
    model = make("har_cnn")
    before = sparsity_loss(model, 0.01).item()
    deepest = model.layers()[-1][1]
    with torch.no_grad():
        deepest.scores["weight"].sub_(1.0)
    assert sparsity_loss(model, 0.01).item() < before


def test_sparsity_loss_pushes_each_layer_with_its_lambda():
    # Shifting all of a layer's scores by -d lowers the loss by lambda_l * mean(sigmoid'(s_l)) * d,
    # so with equal scores everywhere the push per layer grows by ``growth`` with each layer.
    model = make("har_cnn")
    sparsity_loss(model, base_lambda=0.5, growth=3.0).backward()
    pushes = [layer.scores["weight"].grad.sum().item() for _, layer in model.layers()]
    p = torch.sigmoid(torch.tensor(model.mask_config.score_init)).item()
    assert pushes[0] == pytest.approx(0.5 * p * (1 - p), rel=1e-5)
    assert all(b == pytest.approx(3 * a, rel=1e-5) for a, b in itertools.pairwise(pushes))


def test_sparsity_loss_is_zero_without_masked_layers_and_rejects_bad_lambdas():
    unmasked = make("har_cnn", MaskConfig(masked_layers=()))
    assert unmasked.num_mask_bits == 0 and sparsity_loss(unmasked, 1.0).item() == 0.0
    model = make("har_cnn")
    with pytest.raises(ValueError, match="base_lambda"):
        sparsity_loss(model, -1.0)
    with pytest.raises(ValueError, match="growth"):
        layer_lambdas(model, 1.0, growth=0.0)
