"""Streamed top-k against a full numpy sort (lexsort on (score, index))."""

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from daunce_core.errors import DaunceError
from daunce_core.method.topk import top_k


def oracle(scores, k, largest):
    """Per query column: sort all training rows by score (best first), ties by lower index."""
    n, m = scores.shape
    keys = -scores if largest else scores
    order = np.stack([np.lexsort((np.arange(n), keys[:, j]))[:k] for j in range(m)])
    values = np.stack([scores[order[j], j] for j in range(m)]) if m else np.zeros((0, k))
    return order, values


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 10),
    k=st.integers(1, 45),
    chunks=st.tuples(st.integers(1, 43), st.integers(1, 12)),
    levels=st.sampled_from([2, 5, 1000]),
    largest=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_top_k_matches_full_sort(n, m, k, chunks, levels, largest, seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=(n, m)) * levels / 4) / levels  # few levels: many ties
    indices, values = top_k(scores, k, largest=largest, row_chunk=chunks[0], col_chunk=chunks[1])
    expected_indices, expected_values = oracle(scores, min(k, n), largest)
    assert indices.shape == values.shape == (m, min(k, n))
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(values, expected_values)


def test_opponents_are_most_negative_first():
    scores = np.array([[0.5, -1.0], [-2.0, 3.0], [1.0, -1.0], [-2.0, 0.0]])
    indices, values = top_k(scores, 2, largest=False, row_chunk=3)
    np.testing.assert_array_equal(indices, [[1, 3], [0, 2]])
    np.testing.assert_array_equal(values, [[-2.0, -2.0], [-1.0, -1.0]])


def test_proponents_by_hand():
    scores = np.array([[0.5, -1.0], [-2.0, 3.0], [1.0, -1.0], [1.0, 0.0]])
    indices, values = top_k(scores, 3, row_chunk=1)
    np.testing.assert_array_equal(indices, [[2, 3, 0], [1, 3, 0]])
    np.testing.assert_array_equal(values, [[1.0, 1.0, 0.5], [3.0, 0.0, -1.0]])


def test_k_above_n_clamps():
    scores = np.arange(6.0).reshape(3, 2)
    indices, values = top_k(scores, 10)
    np.testing.assert_array_equal(indices, [[2, 1, 0], [2, 1, 0]])
    np.testing.assert_array_equal(values, [[4.0, 2.0, 0.0], [5.0, 3.0, 1.0]])


def test_zarr_scores(tmp_path):
    scores = np.random.default_rng(0).normal(size=(70, 9)).astype(np.float32)
    array = zarr.create_array(store=str(tmp_path / "s"), shape=(70, 9), chunks=(16, 4), dtype="f4")
    array[:] = scores
    indices, values = top_k(array, 5, row_chunk=11, col_chunk=5)
    expected_indices, expected_values = oracle(scores.astype(np.float64), 5, True)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(values, expected_values)


@pytest.mark.parametrize(
    ("scores", "k", "match"),
    [
        (np.zeros((3, 2)), 0, "k must be an integer >= 1"),
        (np.zeros((3, 2)), -1, "k must be an integer >= 1"),
        (np.zeros(3), 1, "must be 2D"),
    ],
)
def test_bad_arguments_raise(scores, k, match):
    with pytest.raises(DaunceError, match=match):
        top_k(scores, k)


def test_bad_chunk_raises():
    with pytest.raises(DaunceError, match="row_chunk"):
        top_k(np.zeros((3, 2)), 1, row_chunk=0)


def test_infinite_scores_rank_last_and_nan_is_refused():
    scores = np.array([[-np.inf, np.inf], [1.0, 2.0], [-np.inf, 0.0]])
    indices, values = top_k(scores, 3, row_chunk=1)
    np.testing.assert_array_equal(indices, [[1, 0, 2], [0, 1, 2]])
    np.testing.assert_array_equal(values, [[1.0, -np.inf, -np.inf], [np.inf, 2.0, 0.0]])
    scores[1, 1] = np.nan
    with pytest.raises(DaunceError, match=r"NaN .* write the scores again"):
        top_k(scores, 2)
