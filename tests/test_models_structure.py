"""Structured sparsity on scores (models.structure): pruned units compact away, kept units never die."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmask.models import build_model
from fedmask.models.compaction import compact_with_report
from fedmask.models.structure import enforce_structure, unit_layers


def _random_scores(model, seed: int, shift: float = 0.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.layers():
            for scores in layer.scores.values():
                scores.copy_(torch.randn(scores.shape, generator=gen) + shift)


@pytest.mark.parametrize(("arch", "kwargs"), [("har_cnn", {}), ("femnist_cnn", {"width": 0.25})])
@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])
def test_pruned_units_are_removed_by_compaction(arch, kwargs, keep):
    model = build_model(arch, 0, 10, **kwargs)
    _random_scores(model, 1)
    kept = enforce_structure(model, keep=keep, floor=0.05)
    _, report = compact_with_report(model.to_plain())
    for layer, unit in zip(report.layers, unit_layers(model)):
        expected = (
            unit.layer.specs[0].shape[0]
            if unit.is_output
            else max(1, int(np.ceil(keep * layer.units_before)))
        )
        assert kept[unit.name] == expected
        # Compaction may remove more (a kept unit nobody reads), never a unit the budget keeps alive.
        assert layer.units_after <= expected, (unit.name, layer)
        assert unit.is_output or layer.units_after >= 0.9 * expected
    if keep < 1.0:
        assert report.size_ratio > 1.0 / keep


def test_floor_keeps_every_class_row_alive_after_collapse():
    model = build_model("har_cnn", 0, 14)
    _random_scores(model, 2, shift=-10.0)  # every score far below the threshold: a collapsed mask
    enforce_structure(model, keep=0.5, floor=0.1)
    out = dict(model.layers())["fc2"]
    rows = out.score_mask("weight")
    assert rows.shape == (14, 128)
    assert bool(rows.any(dim=1).all()), "every class row keeps weights"
    # ...and only weights that read kept fc1 units
    fc1_alive = dict(model.layers())["fc1"].score_mask("weight").any(dim=1)
    assert not bool(rows[:, ~fc1_alive].any())
    assert int(rows.sum(dim=1).min()) >= int(np.ceil(0.1 * int(fc1_alive.sum())))


def test_agreeing_scores_are_left_untouched():
    model = build_model("har_cnn", 0, 14)
    _random_scores(model, 3, shift=5.0)  # every weight strongly kept
    before = model.get_scores()
    enforce_structure(model, keep=1.0, floor=0.2)
    assert np.array_equal(model.get_scores(), before)


def test_ties_break_the_same_way_on_every_device():
    a, b = build_model("har_cnn", 0, 14), build_model("har_cnn", 0, 14)
    enforce_structure(a, keep=0.5)
    enforce_structure(b, keep=0.5)
    assert np.array_equal(a.get_mask(), b.get_mask())
    assert 0.0 < a.get_mask().mean() < 1.0


def test_layer_patterns_limit_pruning():
    model = build_model("har_cnn", 0, 14)
    _random_scores(model, 4)
    kept = enforce_structure(model, keep=0.5, layers=("fc1",))
    assert kept["conv1"] == 32 and kept["conv2"] == 64 and kept["fc1"] == 64


@pytest.mark.parametrize("bad", [{"keep": 0.0}, {"keep": 1.5}, {"floor": -0.1}, {"floor": 2.0}])
def test_bad_budgets_are_rejected(bad):
    with pytest.raises(ValueError):
        enforce_structure(build_model("har_cnn", 0, 14), **bad)
