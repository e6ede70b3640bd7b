"""Partitioners: coverage, reproducibility, skew, and test sets that match each device's train labels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmask.datasets.partition import (
    dirichlet,
    iid,
    largest_remainder,
    matching_test_indices,
    natural,
    shards,
)


def balanced_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "some sample assigned twice or not at all"
    assert np.array_equal(np.sort(joined), np.arange(n))


def same_parts(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@given(st.lists(st.sampled_from(["f1", "f2", "m1", "m10"]), min_size=1, max_size=60))
def test_natural_groups_every_sample_by_its_group(groups: list[str]) -> None:
    parts = natural(groups)
    assert_exact_cover(parts, len(groups))
    for key, idx in zip(sorted(set(groups)), parts):
        assert {groups[i] for i in idx} == {key}


@given(n=st.integers(1, 500), devices=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_iid_covers_everything_with_sizes_within_one(n: int, devices: int, seed: int) -> None:
    if devices > n:
        with pytest.raises(ValueError, match="num_devices"):
            iid(n, devices, seed)
        return
    parts = iid(n, devices, seed)
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_seeded() -> None:
    assert same_parts(iid(1000, 10, seed=3), iid(1000, 10, seed=3))
    assert not same_parts(iid(1000, 10, seed=3), iid(1000, 10, seed=4))


def test_shards_use_all_samples_when_shards_fill_the_data() -> None:
    labels = balanced_labels(10, 60)  # 600 samples -> 10 devices x 2 shards x 30
    parts = shards(labels, num_devices=10, shards_per_device=2, seed=0)
    assert_exact_cover(parts, len(labels))
    for idx in parts:
        classes, counts = np.unique(labels[idx], return_counts=True)
        # A shard of 30 never straddles two classes of 60, so a device holds one or two classes.
        assert len(classes) <= 2
        assert np.all(counts % 30 == 0)


def test_shards_with_explicit_size_pick_whole_shards_without_duplicates() -> None:
    labels = balanced_labels(10, 60)
    parts = shards(labels, num_devices=5, shards_per_device=2, shard_size=30, seed=1)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) == 5 * 2 * 30
    for idx in parts:
        assert len(idx) == 60
        assert np.all(np.unique(labels[idx], return_counts=True)[1] % 30 == 0)


def test_shards_are_seeded() -> None:
    labels = balanced_labels(10, 60)
    assert same_parts(shards(labels, 10, seed=5), shards(labels, 10, seed=5))
    assert not same_parts(shards(labels, 10, seed=5), shards(labels, 10, seed=6))


def test_shards_reject_an_impossible_request() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        shards(balanced_labels(10, 6), num_devices=10, shards_per_device=2, shard_size=4)


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0.05, 50), devices=st.integers(2, 20), seed=st.integers(0, 1000))
def test_dirichlet_assigns_every_sample_once(alpha: float, devices: int, seed: int) -> None:
    # No minimum here: with a tiny alpha and many devices a minimum can be unreachable (tested below).
    labels = balanced_labels(5, 80, seed)
    parts = dirichlet(labels, devices, alpha, seed=seed, min_size=0)
    assert_exact_cover(parts, len(labels))


def test_dirichlet_enforces_the_minimum_size() -> None:
    labels = balanced_labels(5, 80, 0)
    parts = dirichlet(labels, 10, 0.5, seed=3, min_size=5)
    assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_is_seeded() -> None:
    labels = balanced_labels(10, 100)
    assert same_parts(dirichlet(labels, 10, 0.5, seed=1), dirichlet(labels, 10, 0.5, seed=1))
    assert not same_parts(dirichlet(labels, 10, 0.5, seed=1), dirichlet(labels, 10, 0.5, seed=2))


def mean_dominant_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not() -> None:
    labels = balanced_labels(10, 300)
    skewed = mean_dominant_share(labels, dirichlet(labels, 20, alpha=0.05, seed=0))
    near_iid = mean_dominant_share(labels, dirichlet(labels, 20, alpha=1000.0, seed=0))
    # With 10 balanced classes an IID device's largest class is ~1/10 of its data.
    assert near_iid < 0.25
    assert skewed > 0.6


def test_dirichlet_rejects_an_impossible_min_size() -> None:
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet(balanced_labels(2, 10), num_devices=5, alpha=0.1, min_size=5)


@given(
    weights=st.lists(st.integers(0, 1000), min_size=1, max_size=12).filter(lambda w: sum(w) > 0),
    total=st.integers(0, 500),
)
def test_largest_remainder_sums_exactly_and_stays_within_one(weights: list[int], total: int) -> None:
    counts = largest_remainder(np.array(weights), total)
    exact = np.array(weights) / sum(weights) * total
    assert counts.sum() == total
    assert np.all(np.abs(counts - exact) < 1)


def test_matching_test_indices_follow_train_label_proportions() -> None:
    test_labels = balanced_labels(10, 100, seed=9)
    train = [np.array([3] * 300 + [4] * 300), np.array([0] * 450 + [7] * 150), np.array([5] * 10)]
    chosen = matching_test_indices(train, test_labels, num_test=[100, 40, 7], seed=0)
    for idx, y, size in zip(chosen, train, [100, 40, 7]):
        assert len(np.unique(idx)) == len(idx) == size
        expected = largest_remainder(np.bincount(y, minlength=10), size)
        assert np.array_equal(np.bincount(test_labels[idx], minlength=10), expected)


def test_matching_test_indices_refuse_more_than_the_pool_holds() -> None:
    with pytest.raises(ValueError, match="class 3"):
        matching_test_indices([np.array([3, 3])], np.array([3, 4, 4]), num_test=2)


def test_dirichlet_reports_when_min_size_cannot_be_met() -> None:
    # 20 samples, 5 devices, at least 4 each: only an exactly even split works, which alpha=0.01 never draws.
    with pytest.raises(ValueError, match="fewer than 4 samples in 3 attempts"):
        dirichlet(np.repeat(np.arange(2), 10), num_devices=5, alpha=0.01, min_size=4, max_attempts=3)
