"""DAUNCE influence scores from perturbed-model losses, streamed out of core.

Holds the running per-column loss statistics (:class:`LossMoments`, :class:`ScoreStatistics`),
their collection from stored loss rows (:func:`collect_statistics`), and the tiled writing of the
score matrix (:func:`write_scores`, :func:`score_matrix`) and of self-influence
(:func:`self_influence`).

Inputs: ``losses_train`` A with shape ``(K, n)`` and ``losses_query`` B with shape ``(K, m)``;
row ``k`` holds the losses of perturbed copy ``k``, column ``i`` one example. Any 2D array-like
with ``.shape`` and basic slicing ``X[r0:r1, c0:c1]`` works: numpy arrays, ``np.memmap``,
``zarr.Array``.

Orientation, fixed project-wide: ``scores[i, j]``, shape ``(n_train, m_query)``, is the influence
of training example ``i`` on query ``j``. Positive means a proponent (example and query losses move
together), negative an opponent.

Scores (sums over the ``K`` valid perturbed copies only):

- ``covariance``: the paper's equation (6),
  ``I(i, j) = Σ_k (A_ki − Ā_i)(B_kj − B̄_j) / (K − 1)``.
- ``correlation``: ``covariance / (std_i · std_j)`` with ``K − 1`` in the standard deviations;
  a column with zero variance gives correlation 0, never NaN.
- self-influence: ``I(i, i) = Var(A_i)`` (``K − 1`` denominator).

A perturbed copy whose row has any non-finite loss (diverged, or never written: loss stores use
NaN fill) is left out with a :class:`~daunce_core.errors.DaunceWarning`.

Design: only per-column statistics are kept (count, mean, sum of squared deviations), merged with
Chan, Golub and LeVeque's parallel update, so appending perturbed copies updates them exactly as
if all rows had been processed at once. The cross term is deliberately not kept:
:func:`write_scores` recomputes it from the stored loss rows, as a matmul of centred blocks per
(train × query) tile. At ``K`` in the hundreds, re-reading the ``K × (n + m)`` losses is far
cheaper than reading and writing an ``n × m`` float64 co-moment matrix.

Memory: besides the per-column statistics (16 bytes per example), collection holds
``O(K · col_chunk)`` and writing ``O(K · (row_chunk + col_chunk) + row_chunk · col_chunk)``
values (the centred query blocks, kept when ``m <= row_chunk``, fit in ``K · row_chunk``),
whatever ``n`` and ``m`` are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from daunce_core.errors import DaunceError, DaunceWarning

KINDS = ("covariance", "correlation")
"""Score kinds accepted by :func:`write_scores` and :func:`score_matrix`."""


@dataclass
class LossMoments:
    """Per-column running moments of loss rows (Chan et al.'s parallel merge).

    Attributes:
        count: Number of rows (perturbed copies) summarised.
        mean: Column means, shape ``(n,)``, float64.
        m2: Column sums of squared deviations from the mean, shape ``(n,)``, float64.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, n: int) -> LossMoments:
        """Moments of zero rows over ``n`` columns."""
        return cls(0, np.zeros(n), np.zeros(n))

    @classmethod
    def from_rows(cls, rows: ArrayLike) -> LossMoments:
        """Moments of a block of finite loss rows.

        Columns whose values are all equal get their value as the exact mean and ``m2 = 0``, so
        constant columns stay exactly constant through merges and centring.

        Args:
            rows: Finite losses, shape ``(k, n)``; ``k`` may be 0.

        Returns:
            The moments over the ``k`` rows, float64.

        Raises:
            DaunceError: If ``rows`` is not 2D or holds non-finite values.
        """
        rows = np.array(rows, dtype=np.float64)
        _check_2d(rows, "rows")
        if rows.shape[0] == 0:
            return cls.empty(rows.shape[1])
        mean = rows.mean(axis=0)
        constant = (rows == rows[0]).all(axis=0)
        mean[constant] = rows[0, constant]
        rows -= mean
        m2 = np.einsum("ki,ki->i", rows, rows)
        if not np.isfinite(m2).all():
            raise DaunceError(
                "LossMoments.from_rows got non-finite (or overflowing) losses; "
                "select finite rows first, as collect_statistics does."
            )
        return cls(rows.shape[0], mean, m2)

    def merge(self, other: LossMoments) -> LossMoments:
        """Moments of the union of the rows of ``self`` and ``other`` (disjoint row sets).

        Raises:
            DaunceError: If the two cover different numbers of columns.
        """
        if self.mean.shape != other.mean.shape:
            raise DaunceError(
                f"cannot merge moments over {self.mean.shape[0]} and {other.mean.shape[0]} "
                "columns; merge statistics of the same loss arrays only."
            )
        if other.count == 0 or self.count == 0:
            return self if other.count == 0 else other
        total = self.count + other.count
        delta = other.mean - self.mean
        share = other.count / total
        mean = self.mean + delta * share
        m2 = self.m2 + other.m2 + delta * delta * (self.count * share)
        return LossMoments(total, mean, m2)

    def variance(self) -> np.ndarray:
        """Unbiased column variances ``m2 / (count − 1)``, shape ``(n,)``.

        Raises:
            DaunceError: If fewer than 2 rows were summarised.
        """
        _check_enough_rows(self.count)
        return self.m2 / (self.count - 1)


@dataclass
class ScoreStatistics:
    """Everything the scores need besides the loss rows themselves.

    Attributes:
        valid_rows: Sorted int64 indices of the perturbed copies used.
        excluded_rows: Sorted int64 indices of the copies left out (non-finite losses).
        train: Moments over the columns of ``losses_train`` (n training examples).
        query: Moments over the columns of ``losses_query`` (m queries).
    """

    valid_rows: np.ndarray
    excluded_rows: np.ndarray
    train: LossMoments
    query: LossMoments

    @property
    def rows_seen(self) -> int:
        """One past the highest row index collected (valid or excluded); 0 if none."""
        seen = np.concatenate([self.valid_rows, self.excluded_rows])
        return int(seen.max()) + 1 if seen.size else 0

    def merge(self, other: ScoreStatistics) -> ScoreStatistics:
        """Statistics over the rows of ``self`` followed by the (later) rows of ``other``."""
        return ScoreStatistics(
            valid_rows=np.concatenate([self.valid_rows, other.valid_rows]).astype(np.int64),
            excluded_rows=np.concatenate([self.excluded_rows, other.excluded_rows]).astype(
                np.int64
            ),
            train=self.train.merge(other.train),
            query=self.query.merge(other.query),
        )


def collect_statistics(
    losses_train: Any,
    losses_query: Any,
    *,
    start: int = 0,
    stop: int | None = None,
    previous: ScoreStatistics | None = None,
    col_chunk: int = 65536,
) -> ScoreStatistics:
    """Collect per-column statistics of perturbed-copy rows ``[start, stop)``, streamed.

    Reads column chunks ``X[start:stop, c0:c1]`` twice: first to find the rows that are finite in
    both arrays, then to accumulate the moments of those rows. A row with any non-finite value in
    ``losses_train[k]`` or ``losses_query[k]`` is left out with a ``DaunceWarning``.

    Args:
        losses_train: Training-example losses A, shape ``(K, n)``.
        losses_query: Query losses B, shape ``(K, m)``.
        start: First row to collect. Default 0.
        stop: One past the last row to collect. Default ``None``: all ``K`` rows.
        previous: Statistics of earlier rows of the same arrays (all below ``start``), merged
            with the new rows exactly as if all had been collected at once. Default ``None``.
        col_chunk: Columns read per chunk (memory ``O(K · col_chunk)``). Default 65536.

    Returns:
        The statistics over the rows of ``previous`` and rows ``[start, stop)``. It may hold
        fewer than 2 valid rows; the scores then raise.

    Raises:
        DaunceError: On non-2D inputs, different ``K`` in the two arrays, a bad row range,
            ``previous`` with other column counts or rows at or above ``start``.
    """
    a, b = _check_losses(losses_train, losses_query)
    stop = _check_row_range(a.shape[0], start, stop)
    _check_positive(col_chunk=col_chunk)
    if previous is not None:
        _check_previous(previous, a.shape[1], b.shape[1], start)
    rows = np.arange(start, stop, dtype=np.int64)
    finite = _finite_rows(a, start, stop, col_chunk) & _finite_rows(b, start, stop, col_chunk)
    new = ScoreStatistics(
        valid_rows=rows[finite],
        excluded_rows=rows[~finite],
        train=_column_moments(a, rows[finite], col_chunk),
        query=_column_moments(b, rows[finite], col_chunk),
    )
    _warn_excluded(new.excluded_rows)
    return new if previous is None else previous.merge(new)


def write_scores(
    losses_train: Any,
    losses_query: Any,
    stats: ScoreStatistics,
    out: Any = None,
    *,
    kind: str = "correlation",
    row_chunk: int = 4096,
    col_chunk: int = 4096,
    compute_dtype: DTypeLike = np.float64,
) -> Any:
    """Write the score matrix ``scores[i, j]``, shape ``(n_train, m_query)``, tile by tile.

    ``scores[i, j]`` is the influence of training example ``i`` on query ``j``, computed over the
    valid rows of ``stats`` only (rows of the arrays not in ``stats`` are ignored). Each tile of
    ``row_chunk × col_chunk`` (train × query) is the matmul of centred (and, for correlation,
    normalised) loss blocks. Centring is always in float64; the blocks are then cast to
    ``compute_dtype`` for the matmul. The centred query blocks are read once and kept when
    ``m <= row_chunk`` (they then take no more memory than one train block); otherwise they are
    re-read for every train chunk. For an out-of-core ``out`` (zarr), make its chunks a multiple
    of the tile so that no chunk is rewritten, and read ``losses_train`` in whole chunks
    (``row_chunk`` a multiple of its chunk width): each chunk read costs a fixed overhead.

    Args:
        losses_train: Training-example losses A, shape ``(K, n)``.
        losses_query: Query losses B, shape ``(K, m)``.
        stats: Statistics from :func:`collect_statistics` on the same arrays.
        out: Array-like of shape ``(n, m)`` supporting ``out[r0:r1, c0:c1] = tile``. Default
            ``None``: a new numpy float32 array.
        kind: ``"correlation"`` (default) or ``"covariance"``.
        row_chunk: Training examples per tile. Default 4096.
        col_chunk: Queries per tile. Default 4096.
        compute_dtype: ``np.float64`` (default) or ``np.float32`` (faster) for the tile matmul.

    Returns:
        ``out``, filled with the scores, shape ``(n_train, m_query)``.

    Raises:
        DaunceError: On a bad ``kind``, chunk size, ``compute_dtype`` or ``out`` shape, arrays
            that do not match ``stats``, or fewer than 2 valid rows.
    """
    _check_kind(kind)
    dtype = _check_compute_dtype(compute_dtype)
    _check_positive(row_chunk=row_chunk, col_chunk=col_chunk)
    a, b = _check_losses(losses_train, losses_query)
    _check_stats(stats, a.shape, b.shape)
    n, m = a.shape[1], b.shape[1]
    out = _prepare_out(out, n, m)
    a_scale, b_scale = _scales(stats, kind)
    rows = stats.valid_rows
    buffer = np.empty((min(row_chunk, n), min(col_chunk, m)), dtype=dtype)
    kept: dict[int, np.ndarray] | None = {} if m <= row_chunk else None
    for r0 in range(0, n, row_chunk):
        r1 = min(r0 + row_chunk, n)
        a_block = _centred(a, rows, r0, r1, stats.train.mean, a_scale, dtype)
        for c0 in range(0, m, col_chunk):
            c1 = min(c0 + col_chunk, m)
            b_block = _query_block(kept, b, rows, c0, c1, stats.query.mean, b_scale, dtype)
            _write_tile(out, (slice(r0, r1), slice(c0, c1)), a_block, b_block, buffer)
    return out


def score_matrix(
    losses_train: Any,
    losses_query: Any,
    out: Any = None,
    *,
    kind: str = "correlation",
    row_chunk: int = 4096,
    col_chunk: int = 4096,
    compute_dtype: DTypeLike = np.float64,
) -> Any:
    """Collect the statistics of all rows and write ``scores``, shape ``(n_train, m_query)``.

    ``scores[i, j]`` is the influence of training example ``i`` on query ``j``. Shorthand for
    :func:`collect_statistics` followed by :func:`write_scores`; see those for the arguments.

    Returns:
        ``out`` (or a new numpy float32 array), shape ``(n_train, m_query)``.
    """
    _check_kind(kind)
    stats = collect_statistics(losses_train, losses_query)
    return write_scores(
        losses_train,
        losses_query,
        stats,
        out,
        kind=kind,
        row_chunk=row_chunk,
        col_chunk=col_chunk,
        compute_dtype=compute_dtype,
    )


def self_influence(stats: ScoreStatistics) -> np.ndarray:
    """Self-influence ``I(i, i)``: variance of each training example's loss, shape ``(n,)``.

    Equals the diagonal of the covariance ``scores`` (shape ``(n_train, m_query)``) when the query
    set is the training set. Unbiased (``K − 1``), float64.

    Raises:
        DaunceError: If fewer than 2 valid rows were collected.
    """
    return stats.train.variance()


def constant_columns(stats: ScoreStatistics) -> tuple[np.ndarray, np.ndarray]:
    """Training and query columns whose measurement is the same in every valid copy.

    Their scores are exactly 0 (a covariance with a constant; a correlation by convention): they
    rank nothing. Usually the losses underflow (exactly 0 in float32 for a confidently right
    answer) or the base model memorised the data.

    Returns:
        ``(train, query)``: sorted int64 column indices, ``train`` into ``losses_train`` (rows of
        the score matrix), ``query`` into ``losses_query`` (its columns).
    """
    return np.flatnonzero(stats.train.m2 == 0), np.flatnonzero(stats.query.m2 == 0)


def constant_message(
    stats: ScoreStatistics,
    dtype: DTypeLike | None = None,
    query_ids: ArrayLike | None = None,
) -> str | None:
    """What to tell a user about `constant_columns` (None if there are none).

    Names how many query columns (their ids, the first 20, from ``query_ids`` or their
    positions) and training rows are constant over the valid copies, how many of those are
    exactly 0, that their scores are 0 and rank nothing, and the fixes: ``dtype: float64`` for
    losses that underflow in ``dtype``, a smaller learning rate for a base model that memorised
    its training data.
    """
    train, query = constant_columns(stats)
    if len(train) == 0 and len(query) == 0:
        return None
    ids = query if query_ids is None else np.asarray(query_ids)[query]
    shown = ", ".join(str(i) for i in ids[:20]) + (" ..." if len(ids) > 20 else "")
    zeros = int((stats.query.mean[query] == 0).sum() + (stats.train.mean[train] == 0).sum())
    n, m = stats.train.mean.shape[0], stats.query.mean.shape[0]
    precision = f" in {np.dtype(dtype).name}" if dtype is not None else ""
    return (
        f"{len(query)} of {m} query columns"
        + (f" (query ids {shown})" if len(query) else "")
        + f" and {len(train)} of {n} training rows have the same measurement in all "
        f"{len(stats.valid_rows)} valid copies ({zeros} of them exactly 0{precision}): their "
        "scores are 0 and rank nothing. Losses this small underflow: set `dtype: float64` in "
        "the daunce section; if the base model memorised its training data (training losses "
        "near 0), train it with a smaller learning rate (model.train.lr), fewer epochs or more "
        "L2."
    )


def warn_constant(
    stats: ScoreStatistics,
    dtype: DTypeLike | None = None,
    query_ids: ArrayLike | None = None,
) -> str | None:
    """Warn (`DaunceWarning`) with `constant_message` if any column is constant; return it."""
    message = constant_message(stats, dtype, query_ids)
    if message is not None:
        warnings.warn(message, DaunceWarning, stacklevel=2)
    return message


def _check_2d(x: Any, name: str) -> None:
    if len(x.shape) != 2:
        raise DaunceError(
            f"{name} must be 2D (perturbed copies × examples), got shape {tuple(x.shape)}; "
            "reshape it to (K, n)."
        )


def _check_losses(losses_train: Any, losses_query: Any) -> tuple[Any, Any]:
    a = losses_train if hasattr(losses_train, "shape") else np.asarray(losses_train)
    b = losses_query if hasattr(losses_query, "shape") else np.asarray(losses_query)
    _check_2d(a, "losses_train")
    _check_2d(b, "losses_query")
    if a.shape[0] != b.shape[0]:
        raise DaunceError(
            f"losses_train has {a.shape[0]} rows (perturbed copies) but losses_query has "
            f"{b.shape[0]}; pass loss arrays of the same K copies (row k = copy k in both)."
        )
    return a, b


def _check_row_range(k: int, start: int, stop: int | None) -> int:
    stop = k if stop is None else stop
    if not 0 <= start <= stop <= k:
        raise DaunceError(
            f"row range [{start}, {stop}) is not inside the {k} rows of the loss arrays; "
            f"use 0 <= start <= stop <= {k}."
        )
    return stop


def _check_positive(**sizes: int) -> None:
    for name, size in sizes.items():
        if int(size) != size or size < 1:
            raise DaunceError(f"{name} must be a positive integer, got {size!r}; pass e.g. 4096.")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DaunceError(f"unknown score kind {kind!r}; choose one of {list(KINDS)}.")


def _check_compute_dtype(compute_dtype: DTypeLike) -> np.dtype:
    dtype = np.dtype(compute_dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise DaunceError(
            f"compute_dtype {dtype} is not supported; use np.float64 (exact) or np.float32."
        )
    return dtype


def _check_previous(previous: ScoreStatistics, n: int, m: int, start: int) -> None:
    shape = (previous.train.mean.shape[0], previous.query.mean.shape[0])
    if shape != (n, m):
        raise DaunceError(
            f"previous statistics cover {shape} (train, query) columns but the arrays have "
            f"{(n, m)}; collect from scratch (previous=None) for new examples or queries."
        )
    if previous.rows_seen > start:
        raise DaunceError(
            f"previous statistics already include row {previous.rows_seen - 1}, not below "
            f"start={start}; pass start={previous.rows_seen} to add only new perturbed copies."
        )


def _check_enough_rows(count: int) -> None:
    if count < 2:
        raise DaunceError(
            f"scores need at least 2 perturbed copies with finite losses, found {count}; "
            "train and evaluate more copies (or re-run the diverged ones) and collect again."
        )


def _check_stats(stats: ScoreStatistics, a_shape: tuple, b_shape: tuple) -> None:
    _check_enough_rows(len(stats.valid_rows))
    shape = (stats.train.mean.shape[0], stats.query.mean.shape[0])
    if shape != (a_shape[1], b_shape[1]) or stats.valid_rows[-1] >= a_shape[0]:
        raise DaunceError(
            f"statistics over {shape} columns and rows up to {stats.valid_rows[-1]} do not "
            f"match loss arrays of shapes {tuple(a_shape)} and {tuple(b_shape)}; collect "
            "them from these arrays with collect_statistics."
        )


def _prepare_out(out: Any, n: int, m: int) -> Any:
    if out is None:
        return np.empty((n, m), dtype=np.float32)
    if tuple(out.shape) != (n, m):
        raise DaunceError(
            f"out has shape {tuple(out.shape)}, expected (n_train, m_query) = {(n, m)}; "
            "allocate it with that shape or pass out=None."
        )
    return out


def _finite_rows(x: Any, start: int, stop: int, col_chunk: int) -> np.ndarray:
    finite = np.ones(stop - start, dtype=bool)
    if stop == start:
        return finite
    for c0 in range(0, x.shape[1], col_chunk):
        block = np.asarray(x[start:stop, c0 : c0 + col_chunk])
        finite &= np.isfinite(block).all(axis=1)
    return finite


def _read_rows(x: Any, rows: np.ndarray, c0: int, c1: int) -> np.ndarray:
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    block = np.asarray(x[lo:hi, c0:c1])
    return block if len(rows) == hi - lo else block[rows - lo]


def _column_moments(x: Any, rows: np.ndarray, col_chunk: int) -> LossMoments:
    moments = LossMoments.empty(x.shape[1])
    if len(rows) == 0:
        return moments
    moments.count = len(rows)
    for c0 in range(0, x.shape[1], col_chunk):
        c1 = min(c0 + col_chunk, x.shape[1])
        part = LossMoments.from_rows(_read_rows(x, rows, c0, c1))
        moments.mean[c0:c1], moments.m2[c0:c1] = part.mean, part.m2
    return moments


def _warn_excluded(excluded: np.ndarray) -> None:
    if len(excluded) == 0:
        return
    shown = [int(k) for k in excluded[:20]]
    more = f" and {len(excluded) - 20} more" if len(excluded) > 20 else ""
    warnings.warn(
        f"perturbed copies {shown}{more} have non-finite losses and are left out of the scores; "
        "re-train or re-evaluate them and collect again to include them.",
        DaunceWarning,
        stacklevel=3,
    )


def _inverse_root(m2: np.ndarray) -> np.ndarray:
    scale = np.zeros_like(m2)
    np.divide(1.0, np.sqrt(m2), out=scale, where=m2 > 0)
    return scale


def _scales(stats: ScoreStatistics, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "covariance":
        n, m = stats.train.mean.shape[0], stats.query.mean.shape[0]
        return np.full(n, 1.0 / (len(stats.valid_rows) - 1)), np.ones(m)
    return _inverse_root(stats.train.m2), _inverse_root(stats.query.m2)


def _centred(
    x: Any,
    rows: np.ndarray,
    c0: int,
    c1: int,
    mean: np.ndarray,
    scale: np.ndarray,
    dtype: np.dtype,
) -> np.ndarray:
    block = np.array(_read_rows(x, rows, c0, c1), dtype=np.float64)
    block -= mean[c0:c1]
    block *= scale[c0:c1]
    return block.astype(dtype, copy=False)


def _query_block(
    kept: dict[int, np.ndarray] | None,
    b: Any,
    rows: np.ndarray,
    c0: int,
    c1: int,
    mean: np.ndarray,
    scale: np.ndarray,
    dtype: np.dtype,
) -> np.ndarray:
    """Centred query block ``[c0, c1)``, kept in ``kept`` (if given) for later train chunks."""
    if kept is None:
        return _centred(b, rows, c0, c1, mean, scale, dtype)
    if c0 not in kept:
        kept[c0] = _centred(b, rows, c0, c1, mean, scale, dtype)
    return kept[c0]


def _write_tile(
    out: Any, tile: tuple[slice, slice], a_block: np.ndarray, b_block: np.ndarray, buffer: Any
) -> None:
    """``out[tile] = a_block.T @ b_block``, straight into ``out`` when it is numpy of that dtype.

    Otherwise through the reused ``buffer``: a fresh tile per matmul would cost page faults.
    """
    if isinstance(out, np.ndarray) and out.dtype == a_block.dtype:
        np.matmul(a_block.T, b_block, out=out[tile])
        return
    result = np.matmul(a_block.T, b_block, out=buffer[: a_block.shape[1], : b_block.shape[1]])
    if not isinstance(out, np.ndarray):
        result = result.astype(getattr(out, "dtype", result.dtype), copy=False)
    out[tile] = result
