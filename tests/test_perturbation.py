"""Draws are deterministic from (seed, k), independent of grouping, and of the right shape."""

import numpy as np
import pytest

from daunce_core import DaunceError
from daunce_core.method.draws import draw_perturbation, epoch_order


def test_draws_depend_only_on_seed_and_k():
    a = draw_perturbation(100, 7, seed=3, subset_ratio=0.3)
    b = draw_perturbation(100, 7, seed=3, subset_ratio=0.3)
    c = draw_perturbation(100, 8, seed=3, subset_ratio=0.3)
    d = draw_perturbation(100, 7, seed=4, subset_ratio=0.3)
    np.testing.assert_array_equal(a.subset, b.subset)
    np.testing.assert_array_equal(a.xi, b.xi)
    assert not np.array_equal(a.xi, c.xi)
    assert not np.array_equal(a.xi, d.xi)


def test_subset_is_sorted_unique_and_of_ratio_size():
    draw = draw_perturbation(1000, 0, seed=0, subset_ratio=0.3)
    assert len(draw.subset) == 300
    assert np.all(np.diff(draw.subset) > 0)
    assert draw.xi.shape == (1000,)
    assert np.all((draw.xi > 0) & (draw.xi < 1))


def test_xi_is_uniform_and_subsets_cover_the_data_evenly():
    draws = [draw_perturbation(200, k, seed=0, subset_ratio=0.3) for k in range(400)]
    xi = np.concatenate([d.xi for d in draws])
    assert abs(xi.mean() - 0.5) < 0.005
    assert abs(xi.var() - 1 / 12) < 0.002
    counts = np.bincount(np.concatenate([d.subset for d in draws]), minlength=200)
    assert abs(counts.mean() / 400 - 0.3) < 1e-12
    assert counts.min() > 80
    assert counts.max() < 160


def test_full_ratio_takes_every_example():
    draw = draw_perturbation(50, 3, seed=0, subset_ratio=1.0)
    np.testing.assert_array_equal(draw.subset, np.arange(50))


def test_antithetic_pairs_share_subset_and_order_and_mirror_xi():
    even = draw_perturbation(100, 4, seed=1, subset_ratio=0.5, antithetic=True)
    odd = draw_perturbation(100, 5, seed=1, subset_ratio=0.5, antithetic=True)
    np.testing.assert_array_equal(even.subset, odd.subset)
    np.testing.assert_allclose(even.xi + odd.xi, 1.0)
    np.testing.assert_array_equal(epoch_order(even, 2, seed=1), epoch_order(odd, 2, seed=1))
    other = draw_perturbation(100, 6, seed=1, subset_ratio=0.5, antithetic=True)
    assert not np.array_equal(even.subset, other.subset)


def test_epoch_order_is_a_fresh_permutation_of_the_subset_each_epoch():
    draw = draw_perturbation(100, 0, seed=0, subset_ratio=0.4)
    first, second = epoch_order(draw, 0, seed=0), epoch_order(draw, 1, seed=0)
    np.testing.assert_array_equal(np.sort(first), draw.subset)
    np.testing.assert_array_equal(np.sort(second), draw.subset)
    assert not np.array_equal(first, second)


def test_empty_subset_is_refused_with_the_fix():
    with pytest.raises(DaunceError, match="empty subset; raise subset_ratio"):
        draw_perturbation(10, 0, seed=0, subset_ratio=0.01)
