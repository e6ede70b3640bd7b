"""LG-FedAvg: only the global head travels; the representation layers stay on the device."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_harness import run_federation, tiny_devices, tiny_spec, torch_threads

from fedmask.models import WeightMode
from fedmask.strategies import get_strategy
from fedmask.strategies.lgfedavg import global_layer_names
from fedmask.strategies.model_factory import build_for


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def devices():
    return tiny_devices(train_per_device=40)


def test_split_by_count_or_by_name():
    model = build_for(tiny_spec("lgfedavg"), WeightMode.DENSE)
    names = [n for n, _ in model.layers()]
    assert global_layer_names(model, 2) == names[-2:]
    assert global_layer_names(model, ["fc*"]) == [n for n in names if n.startswith("fc")]
    assert global_layer_names(model, ["conv2", "fc2"]) == ["conv2", "fc2"]
    with pytest.raises(ValueError, match="between 1 and"):
        global_layer_names(model, 0)
    with pytest.raises(ValueError, match="no match for \\['head'\\]"):
        global_layer_names(model, ["head"])


@pytest.mark.parametrize("split", [1, ["conv1", "fc2"]])
def test_only_global_layers_travel_and_local_layers_stay_personal(devices, split):
    spec = tiny_spec("lgfedavg", global_layers=split)
    model = build_for(spec, WeightMode.DENSE)
    shared = {
        layer.key(t)
        for name, layer in model.layers()
        if name in global_layer_names(model, split)
        for t in layer.trainable()
    }
    run = run_federation(spec, devices, rounds=2)
    assert set(run.server.expected_update()) == shared
    weights = [c.model.get_weights() for c in run.clients]
    for name in weights[0]:
        same = all(np.array_equal(weights[0][name], w[name]) for w in weights[1:])
        # After the final merge every device holds the same global layers and its own local ones.
        assert same == (name in shared), name
    dense_bytes = sum(w.nbytes for w in weights[0].values())
    shared_bytes = sum(weights[0][n].nbytes for n in shared)
    assert max(run.uplink_bytes) < shared_bytes + 1024 < dense_bytes


def test_global_layers_setting_must_name_layers(devices):
    with pytest.raises(ValueError, match="global_layers"):
        get_strategy("lgfedavg").client(tiny_spec("lgfedavg", global_layers="fc2"), devices[0])
