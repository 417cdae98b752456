"""Streamed DAUNCE scores against in-memory numpy oracles (np.cov, np.corrcoef, np.var)."""

import itertools
import warnings

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from daunce_core.errors import DaunceError, DaunceWarning
from daunce_core.method.scores import (
    KINDS,
    LossMoments,
    collect_statistics,
    score_matrix,
    self_influence,
    write_scores,
)


def oracle(a, b, kind):
    """Scores (n, m) from the finite rows, by np.cov / np.corrcoef on the stacked columns."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    stacked = np.hstack([a[keep], b[keep]])
    n = a.shape[1]
    matrix = np.cov(stacked, rowvar=False) if kind == "covariance" else _corr(stacked)
    return np.atleast_2d(matrix)[:n, n:]


def _corr(stacked):
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(stacked, rowvar=False)
    return np.nan_to_num(np.atleast_2d(corr), nan=0.0)


def losses(rng, k, n, offset=3.0):
    """Loss-like rows: a shared offset plus noise correlated through a few latent factors."""
    latent = rng.normal(size=(k, 3))
    return offset + latent @ rng.normal(size=(3, n)) + 0.5 * rng.normal(size=(k, n))


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 10),
    n=st.integers(1, 50),
    m=st.integers(1, 30),
    kind=st.sampled_from(["covariance", "correlation"]),
    chunks=st.tuples(st.floats(0, 1), st.floats(0, 1), st.integers(1, 60)),
    seed=st.integers(0, 2**32 - 1),
)
def test_streamed_scores_match_in_memory(k, n, m, kind, chunks, seed):
    rng = np.random.default_rng(seed)
    a, b = losses(rng, k, n), losses(rng, k, m)
    row_chunk, col_chunk = 1 + int(chunks[0] * (n + 2)), 1 + int(chunks[1] * (m + 2))
    stats = collect_statistics(a, b, col_chunk=chunks[2])
    out = write_scores(
        a, b, stats, np.zeros((n, m)), kind=kind, row_chunk=row_chunk, col_chunk=col_chunk
    )
    np.testing.assert_allclose(out, oracle(a, b, kind), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["covariance", "correlation"])
def test_float32_compute_is_close(kind):
    rng = np.random.default_rng(0)
    a, b = losses(rng, 40, 300), losses(rng, 40, 70)
    out = score_matrix(a, b, kind=kind, row_chunk=64, col_chunk=32, compute_dtype=np.float32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, oracle(a, b, kind), rtol=1e-4, atol=1e-5)


def test_default_out_is_float32_numpy():
    rng = np.random.default_rng(1)
    a, b = losses(rng, 6, 9), losses(rng, 6, 4)
    out = score_matrix(a, b)
    assert out.shape == (9, 4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, oracle(a, b, "correlation"), rtol=1e-6, atol=1e-6)


def test_moments_match_numpy():
    rows = losses(np.random.default_rng(2), 7, 11)
    moments = LossMoments.from_rows(rows[:3]).merge(LossMoments.from_rows(rows[3:]))
    assert moments.count == 7
    np.testing.assert_allclose(moments.mean, rows.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(moments.variance(), rows.var(axis=0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("splits", [[1], [5], [11], [3, 4, 9], [0, 12]])
def test_incremental_statistics_equal_all_at_once(splits):
    rng = np.random.default_rng(3)
    a, b = losses(rng, 12, 40, offset=100.0), losses(rng, 12, 15, offset=100.0)
    stats = None
    for start, stop in zip([0, *splits], [*splits, 12], strict=True):
        stats = collect_statistics(a, b, start=start, stop=stop, previous=stats, col_chunk=7)
    full = collect_statistics(a, b)
    np.testing.assert_array_equal(stats.valid_rows, np.arange(12))
    for part in ("train", "query"):
        merged, whole = getattr(stats, part), getattr(full, part)
        assert merged.count == whole.count == 12
        np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=0)
        np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-12, atol=0)
    for kind in ("covariance", "correlation"):
        got = write_scores(a, b, stats, np.zeros((40, 15)), kind=kind, row_chunk=9)
        np.testing.assert_allclose(got, oracle(a, b, kind), rtol=1e-12, atol=1e-12)


def test_incremental_with_excluded_row_in_later_batch():
    rng = np.random.default_rng(4)
    a, b = losses(rng, 10, 20), losses(rng, 10, 6)
    b[8, 2] = np.nan
    first = collect_statistics(a, b, stop=4)
    with pytest.warns(DaunceWarning, match=r"\[8\]"):
        stats = collect_statistics(a, b, start=4, previous=first)
    np.testing.assert_array_equal(stats.excluded_rows, [8])
    got = write_scores(a, b, stats, np.zeros((20, 6)), kind="covariance")
    np.testing.assert_allclose(got, oracle(a, b, "covariance"), rtol=1e-12, atol=1e-12)


def test_previous_must_end_before_start():
    rng = np.random.default_rng(5)
    a, b = losses(rng, 6, 5), losses(rng, 6, 3)
    first = collect_statistics(a, b, stop=4)
    with pytest.raises(DaunceError, match=r"start=4"):
        collect_statistics(a, b, start=3, previous=first)
    with pytest.raises(DaunceError, match="from scratch"):
        collect_statistics(a[:, :4], b, start=4, previous=first)


@pytest.mark.parametrize("kind", ["covariance", "correlation"])
def test_non_finite_rows_are_left_out_with_a_warning(kind):
    rng = np.random.default_rng(6)
    a, b = losses(rng, 10, 25), losses(rng, 10, 8)
    a[3, 17], b[7, 0] = np.nan, np.inf
    with pytest.warns(DaunceWarning, match=r"perturbed copies \[3, 7\] .* left out"):
        got = score_matrix(a, b, np.zeros((25, 8)), kind=kind, row_chunk=4, col_chunk=3)
    clean = oracle(np.delete(a, [3, 7], axis=0), np.delete(b, [3, 7], axis=0), kind)
    np.testing.assert_allclose(got, clean, rtol=1e-12, atol=1e-12)


def test_all_rows_non_finite_raises():
    a, b = np.full((4, 5), np.nan), np.zeros((4, 3))
    with pytest.warns(DaunceWarning), pytest.raises(DaunceError, match="at least 2"):
        score_matrix(a, b)


def test_one_valid_row_raises():
    rng = np.random.default_rng(7)
    a, b = losses(rng, 3, 5), losses(rng, 3, 2)
    a[1:, 0] = -np.inf
    with pytest.warns(DaunceWarning), pytest.raises(DaunceError, match="found 1"):
        score_matrix(a, b)
    with pytest.warns(DaunceWarning):
        stats = collect_statistics(a, b)
    with pytest.raises(DaunceError, match="at least 2"):
        self_influence(stats)


def test_bad_inputs_raise_with_the_fix():
    rng = np.random.default_rng(8)
    a, b = losses(rng, 5, 6), losses(rng, 5, 4)
    with pytest.raises(DaunceError, match=r"5 rows .* has 4"):
        score_matrix(a, b[:4])
    with pytest.raises(DaunceError, match=r"out has shape \(4, 6\).*\(6, 4\)"):
        score_matrix(a, b, np.zeros((4, 6)))
    with pytest.raises(DaunceError, match=r"'pearson'.*'covariance', 'correlation'"):
        score_matrix(a, b, kind="pearson")
    with pytest.raises(DaunceError, match="must be 2D"):
        score_matrix(a[0], b)
    with pytest.raises(DaunceError, match="row_chunk must be a positive integer"):
        score_matrix(a, b, row_chunk=0)
    with pytest.raises(DaunceError, match="compute_dtype"):
        score_matrix(a, b, compute_dtype=np.float16)
    with pytest.raises(DaunceError, match="row range"):
        collect_statistics(a, b, start=2, stop=9)


def test_stats_from_other_arrays_raise():
    rng = np.random.default_rng(9)
    a, b = losses(rng, 5, 6), losses(rng, 5, 4)
    stats = collect_statistics(a, b)
    with pytest.raises(DaunceError, match="collect them from these arrays"):
        write_scores(a[:, :5], b, stats)
    with pytest.raises(DaunceError, match="collect them from these arrays"):
        write_scores(a[:3], b[:3], stats)


@pytest.mark.parametrize("value", [0.1, 1e30, 7.0])
def test_zero_variance_column_gives_zero_correlation(value):
    rng = np.random.default_rng(10)
    a, b = losses(rng, 9, 6), losses(rng, 9, 5)
    a[:, 2], b[:, 1] = value, 0.3
    merged = collect_statistics(a, b, start=3, previous=collect_statistics(a, b, stop=3))
    for stats, kind in itertools.product([collect_statistics(a, b), merged], KINDS):
        got = write_scores(a, b, stats, np.full((6, 5), np.nan), kind=kind, row_chunk=4)
        assert np.isfinite(got).all()
        assert (got[2] == 0).all()
        assert (got[:, 1] == 0).all()
        # np.cov itself leaves rounding noise in constant columns (0.09 at 1e30): compare the rest
        others = np.delete(np.delete(got, 2, axis=0), 1, axis=1)
        expected = np.delete(np.delete(oracle(a, b, kind), 2, axis=0), 1, axis=1)
        np.testing.assert_allclose(others, expected, rtol=1e-10, atol=1e-10)


def test_self_influence_is_diagonal_of_covariance():
    a = losses(np.random.default_rng(11), 15, 30)
    stats = collect_statistics(a, a, col_chunk=4)
    scores = write_scores(a, a, stats, np.zeros((30, 30)), kind="covariance", row_chunk=7)
    np.testing.assert_allclose(self_influence(stats), np.diag(scores), rtol=1e-12)
    np.testing.assert_allclose(self_influence(stats), a.var(axis=0, ddof=1), rtol=1e-12)


def _zarr(path, data, chunks):
    array = zarr.create_array(
        store=str(path), shape=data.shape, chunks=chunks, dtype="float32", fill_value=np.nan
    )
    array[:] = data
    return array


@pytest.mark.parametrize("kind", ["covariance", "correlation"])
def test_zarr_arrays_on_disk(tmp_path, kind):
    rng = np.random.default_rng(12)
    k, n, m = 9, 53, 17
    a = losses(rng, k, n).astype(np.float32)
    b = losses(rng, k, m).astype(np.float32)
    za = zarr.create_array(
        store=str(tmp_path / "a"), shape=(k, n), chunks=(1, 7), dtype="float32", fill_value=np.nan
    )
    for row in range(k - 1):  # the last perturbed copy never finished: its row stays NaN fill
        za[row] = a[row]
    zb = _zarr(tmp_path / "b", b, (1, 5))
    out = zarr.create_array(
        store=str(tmp_path / "out"), shape=(n, m), chunks=(6, 4), dtype="float32"
    )
    with pytest.warns(DaunceWarning, match=r"\[8\]"):
        stats = collect_statistics(za, zb, col_chunk=10)
    write_scores(za, zb, stats, out, kind=kind, row_chunk=8, col_chunk=3)
    expected = oracle(a[: k - 1], b[: k - 1], kind)
    np.testing.assert_allclose(out[:], expected, rtol=2e-5, atol=2e-5)


def test_memmap_out(tmp_path):
    rng = np.random.default_rng(13)
    a, b = losses(rng, 5, 12), losses(rng, 5, 7)
    out = np.lib.format.open_memmap(tmp_path / "s.npy", mode="w+", dtype=np.float64, shape=(12, 7))
    score_matrix(a, b, out, kind="covariance", row_chunk=5, col_chunk=2)
    out.flush()
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), oracle(a, b, "covariance"), rtol=1e-12)


class ReadLog:
    """Array wrapper that records the shape of every read."""

    def __init__(self, data):
        self.data, self.shape, self.reads = data, data.shape, []

    def __getitem__(self, key):
        block = self.data[key]
        self.reads.append(block.shape)
        return block


@pytest.mark.parametrize(("row_chunk", "query_reads"), [(10, 10 * 5), (40, 5)])
def test_reads_are_bounded_by_chunks(row_chunk, query_reads):
    rng = np.random.default_rng(14)
    a, b = ReadLog(losses(rng, 6, 100)), ReadLog(losses(rng, 6, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = collect_statistics(a, b, col_chunk=16)
        got = write_scores(a, b, stats, np.zeros((100, 40)), row_chunk=row_chunk, col_chunk=8)
    assert max(cols for _, cols in a.reads) <= max(16, row_chunk)
    assert max(cols for _, cols in b.reads) <= 16
    assert len(a.reads) == 2 * 7 + -(-100 // row_chunk)
    assert len(b.reads) == 2 * 3 + query_reads  # query blocks are kept when m <= row_chunk
    np.testing.assert_allclose(got, oracle(a.data, b.data, "correlation"), rtol=1e-12)
