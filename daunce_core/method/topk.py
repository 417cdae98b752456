"""Top-k proponents and opponents per query, streamed over a score matrix.

Holds :func:`top_k`, which reads a score matrix ``scores[i, j]`` of shape
``(n_train, m_query)`` (influence of training example ``i`` on query ``j``, the orientation fixed
project-wide; see :mod:`daunce_core.method.scores` and the paper's equation (6)) in tiles and keeps
a
running best ``k`` per query. Memory is ``O(row_chunk · col_chunk + m · k)`` whatever ``n`` is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from daunce_core.errors import DaunceError


def top_k(
    scores: Any,
    k: int,
    *,
    largest: bool = True,
    row_chunk: int = 8192,
    col_chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` training examples for every query of a score matrix, streamed over tiles.

    Args:
        scores: Array-like of shape ``(n_train, m_query)``; ``scores[i, j]`` is the influence of
            training example ``i`` on query ``j`` (numpy, ``np.memmap``, ``zarr.Array``). NaN is
            refused; ``±inf`` ranks last (``-inf`` for proponents, ``+inf`` for opponents).
        k: How many training examples per query; clamped to ``n_train``.
        largest: ``True`` (default) for proponents (largest scores first); ``False`` for
            opponents (most negative first).
        row_chunk: Training examples read per tile. Default 8192.
        col_chunk: Queries read per tile. Default 4096.

    Returns:
        ``(indices, values)``, both of shape ``(m_query, min(k, n_train))``: training-example
        indices (int64) and their scores (float64) per query, best first; ties go to the lower
        training index.

    Raises:
        DaunceError: If ``scores`` is not 2D or holds NaN, or if ``k``, ``row_chunk`` or
            ``col_chunk`` is below 1.
    """
    _check_args(scores, k, row_chunk, col_chunk)
    n, m = scores.shape
    k = min(k, n)
    sign = -1.0 if largest else 1.0
    if n == 0 or m == 0:
        return np.zeros((m, k), dtype=np.int64), np.zeros((m, k))
    keys, indices = np.full((m, 0), np.inf), np.zeros((m, 0), dtype=np.int64)
    for r0 in range(0, n, row_chunk):
        r1 = min(r0 + row_chunk, n)
        keys, indices = _widen(keys, indices, min(k, r1), sentinel=n)
        for c0 in range(0, m, col_chunk):
            c1 = min(c0 + col_chunk, m)
            block = _read_keys(scores, r0, r1, c0, c1, sign)
            candidates = np.concatenate([keys[c0:c1], block], axis=1)
            ids = np.concatenate([indices[c0:c1], _row_ids(r0, r1, c1 - c0)], axis=1)
            keys[c0:c1], indices[c0:c1] = _smallest(candidates, ids, keys.shape[1])
    return indices, sign * keys


def _check_args(scores: Any, k: int, row_chunk: int, col_chunk: int) -> None:
    if len(scores.shape) != 2:
        raise DaunceError(
            f"scores must be 2D (n_train, m_query), got shape {tuple(scores.shape)}; "
            "pass the score matrix written by write_scores."
        )
    for name, value in (("k", k), ("row_chunk", row_chunk), ("col_chunk", col_chunk)):
        if int(value) != value or value < 1:
            raise DaunceError(f"{name} must be an integer >= 1, got {value!r}; pass e.g. 10.")


def _row_ids(r0: int, r1: int, columns: int) -> np.ndarray:
    return np.broadcast_to(np.arange(r0, r1, dtype=np.int64), (columns, r1 - r0))


def _read_keys(scores: Any, r0: int, r1: int, c0: int, c1: int, sign: float) -> np.ndarray:
    """Sort keys (smaller is better), shape ``(c1 - c0, r1 - r0)``, of one tile of scores."""
    block = np.asarray(scores[r0:r1, c0:c1], dtype=np.float64)
    if np.isnan(block).any():
        raise DaunceError(
            f"scores[{r0}:{r1}, {c0}:{c1}] holds NaN (a tile never written?); "
            "write the scores again with write_scores before ranking them."
        )
    return np.ascontiguousarray(sign * block.T)


def _widen(
    keys: np.ndarray, indices: np.ndarray, width: int, sentinel: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad the running best to ``width`` with entries that every real score beats."""
    pad = width - keys.shape[1]
    if pad == 0:
        return keys, indices
    keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=np.inf)
    return keys, np.pad(indices, ((0, 0), (0, pad)), constant_values=sentinel)


def _smallest(keys: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` entries with the smallest ``(key, id)``, in that order."""
    if k < keys.shape[1]:
        pick = np.argpartition(keys, k - 1, axis=1)[:, :k]
        pick = _resolve_boundary_ties(keys, ids, pick, k)
        keys = np.take_along_axis(keys, pick, axis=1)
        ids = np.take_along_axis(ids, pick, axis=1)
    order = np.lexsort((ids, keys), axis=1)
    return np.take_along_axis(keys, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _resolve_boundary_ties(
    keys: np.ndarray, ids: np.ndarray, pick: np.ndarray, k: int
) -> np.ndarray:
    """Re-pick, by full ``(key, id)`` order, the rows where ties straddle the k-th place."""
    kth = np.take_along_axis(keys, pick, axis=1).max(axis=1)
    tied = np.flatnonzero((keys <= kth[:, None]).sum(axis=1) > k)
    if tied.size:
        pick[tied] = np.lexsort((ids[tied], keys[tied]), axis=1)[:, :k]
    return pick
