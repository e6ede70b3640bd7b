"""FedMask's halves: aggregation rules on hand-built masks, and learning on real HMP data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmask.protocol.tensor_codec import decode_body, encode_body
from fedmask.strategies import ClientUpdate, TaskSpec, get_strategy
from fedmask.strategies.mask_rules import Majority, NoMerge, Overlap, make_rule


def _decoded(body):
    return decode_body(encode_body(body))


def test_majority_rule_adopts_the_majority_mask_keeping_score_magnitudes():
    share = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    body = _decoded(Majority().server_body(share))
    assert body["mask"].tolist() == [False, False, True, True, True]
    scores = np.array([2.0, 0.5, -1.5, -0.1, 3.0], dtype=np.float32)
    merged = Majority().merge(scores, body)
    assert merged.tolist() == pytest.approx([-2.0, -0.5, 1.5, 0.1, 3.0])


def test_overlap_rule_adopts_consensus_keeps_and_leaves_the_rest_personal():
    share = np.array([0.0, 0.3, 0.5, 0.7, 0.8, 1.0])
    body = _decoded(Overlap(keep_share=0.75).server_body(share))
    assert set(body) == {"keep"}  # no consensus drop by default
    assert body["keep"].tolist() == [False, False, False, False, True, True]
    scores = np.array([1.0, -1.0, 1.0, -1.0, -2.0, 0.5], dtype=np.float32)
    merged = Overlap(keep_share=0.75).merge(scores, body)
    # A rarely kept weight (share 0.0) that this device keeps stays kept: it is personal.
    assert merged.tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0, 2.0, 0.5])


def test_overlap_rule_with_consensus_drop():
    share = np.array([0.0, 0.3, 0.5, 0.7, 0.8, 1.0])
    rule = Overlap(keep_share=0.75, drop_share=0.25)
    body = _decoded(rule.server_body(share))
    assert body["drop"].tolist() == [True, False, False, False, False, False]
    scores = np.array([1.0, -1.0, 1.0, -1.0, -2.0, 0.5], dtype=np.float32)
    assert rule.merge(scores, body).tolist() == pytest.approx([-1.0, -1.0, 1.0, -1.0, 2.0, 0.5])


def test_no_merge_rule_sends_nothing_and_changes_nothing():
    scores = np.array([1.0, -1.0], dtype=np.float32)
    assert NoMerge().server_body(np.array([1.0, 0.0])) == {}
    assert NoMerge().merge(scores, {}).tolist() == scores.tolist()


def test_rule_parameters_are_validated():
    with pytest.raises(ValueError, match="drop_share < keep_share"):
        Overlap(keep_share=0.2, drop_share=0.5)
    with pytest.raises(ValueError, match="unknown mask aggregation rule"):
        make_rule("median")


def test_server_counts_weighted_masks():
    spec = TaskSpec(strategy="fedmask", arch="har_cnn", num_classes=14, hyper={"mask_rule": "majority"})
    server = get_strategy("fedmask").server(spec)
    n = server.num_bits
    ones, zeros = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    # A fresh "keep" (weight 1) outweighs two stale "drop"s (weight 0.4 each).
    updates = [
        ClientUpdate("a", {"mask": ones}, 10, weight=1.0),
        ClientUpdate("b", {"mask": zeros}, 10, staleness=3, weight=0.4),
        ClientUpdate("c", {"mask": zeros}, 10, staleness=3, weight=0.4),
    ]
    body = _decoded(server.aggregate(updates, round_no=1))
    assert body["mask"].all()
    updates[0].weight = 0.5
    assert not _decoded(server.aggregate(updates, round_no=1))["mask"].any()


def test_decoupled_sparsity_step_pulls_each_layer_at_its_depth_rate():
    from fedmask.models import WeightMode, build_model
    from fedmask.models.sparsity import decoupled_sparsity_step, layer_lambdas

    model = build_model("har_cnn", seed=0, num_classes=4)
    model.set_mode(WeightMode.MASK)
    before = {
        name: torch.cat([s.detach().reshape(-1) for s in layer.scores.values()])
        for name, layer in model.layers()
    }
    decoupled_sparsity_step(model, base_lambda=0.01, growth=2.0, lr=0.1)
    lambdas = layer_lambdas(model, 0.01, 2.0)
    for name, layer in model.layers():
        after = torch.cat([s.detach().reshape(-1) for s in layer.scores.values()])
        sig = torch.sigmoid(before[name])
        assert torch.allclose(before[name] - after, 0.1 * lambdas[name] * sig * (1 - sig), atol=1e-6)
    assert list(lambdas.values()) == sorted(lambdas.values())  # deeper layers are pulled harder


def test_a_one_class_device_keeps_a_live_network():
    """Regression: with the penalty inside Adam and no guard, a device whose task loss reached zero pruned
    whole layers to nothing within two rounds and its model answered every input with all-zero logits.
    The unit floor (models.structure) now keeps every kept unit and every class row alive."""
    from fedmask.datasets.federated import DeviceData

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 3, 128)).astype(np.float32)
    data = DeviceData("solo", x[:192], np.full(192, 3), x[192:], np.full(64, 3))
    spec = TaskSpec(strategy="fedmask", arch="har_cnn", num_classes=6, hyper={"local_epochs": 3})
    client = get_strategy("fedmask").client(spec, data)
    for round_no in (1, 2, 3):
        client.fit(None, round_no)
    densities = client.model.layer_densities()
    assert min(densities.values()) > 0.005, densities
    classifier = dict(client.model.layers())["fc2"].score_mask("weight")
    assert bool(classifier.any(dim=1).all()), "every class row keeps weights"
    assert client.evaluate(None).accuracy == 1.0
    with torch.no_grad():
        assert float(client.model(torch.from_numpy(x[192:])).abs().max()) > 0
