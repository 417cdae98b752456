"""Parquet exports of a run's scores: what users query with SQL.

* ``top_proponents`` / ``top_opponents``: ``(run_id, query_id, rank, train_id, score,
  method)``, the ``k`` training examples with the highest / lowest scores for every query
  (rank 1 = best); ``method`` is ``daunce``, or a baseline's name for its own tables;
* ``example_influence``: per training example, ``self_influence`` (variance of its loss across
  the copies: a data-quality signal) and ``total_positive`` / ``total_negative`` (the sums of its
  positive and negative scores over all queries);
* ``examples``: the example index of both splits (``split``, ``example_id``, ``digest`` and
  every scalar column, e.g. the label), to join on ids.

Scores are read in row chunks of the ``[n_train, m_query]`` matrix, so memory stays bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from daunce_core.method.topk import top_k


def top_table(
    scores: Any,
    run_id: str,
    train_ids: np.ndarray,
    query_ids: np.ndarray,
    k: int,
    largest: bool,
    method: str = "daunce",
) -> pl.DataFrame:
    """The top-``k`` table of every query (proponents if ``largest``, else opponents)."""
    index, values = top_k(scores, k, largest=largest)
    m, kk = index.shape
    return pl.DataFrame(
        {
            "run_id": [run_id] * (m * kk),
            "query_id": np.repeat(query_ids, kk),
            "rank": np.tile(np.arange(1, kk + 1), m),
            "train_id": train_ids[index.ravel()],
            "score": values.ravel(),
            "method": [method] * (m * kk),
        }
    )


def influence_totals(scores: Any, row_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per training example, the sums of its positive and of its negative scores; ``[n]`` each."""
    n = scores.shape[0]
    positive, negative = np.zeros(n), np.zeros(n)
    for r0 in range(0, n, row_chunk):
        block = np.asarray(scores[r0 : r0 + row_chunk], dtype=np.float64)
        positive[r0 : r0 + len(block)] = np.where(block > 0, block, 0).sum(axis=1)
        negative[r0 : r0 + len(block)] = np.where(block < 0, block, 0).sum(axis=1)
    return positive, negative


def example_influence_table(
    scores: Any, self_influence: np.ndarray, run_id: str, train_ids: np.ndarray
) -> pl.DataFrame:
    """Per-example aggregates of the training set."""
    positive, negative = influence_totals(scores)
    return pl.DataFrame(
        {
            "run_id": [run_id] * len(train_ids),
            "train_id": train_ids,
            "self_influence": np.asarray(self_influence, dtype=np.float64),
            "total_positive": positive,
            "total_negative": negative,
        }
    )


def write_parquet(frame: pl.DataFrame, path: str | Path) -> str:
    """Write ``frame`` to ``path`` atomically (temporary file, then rename); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".parquet.partial")
    frame.write_parquet(partial)
    partial.replace(path)
    return str(path)
