"""Rank statistics for evaluation: Spearman correlation per column, ROC AUC."""

from __future__ import annotations

import numpy as np

from daunce_core.errors import DaunceError


def average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks along axis 0, ties sharing their mean rank (scipy's rankdata minus 1)."""
    order = np.argsort(values, axis=0, kind="stable")
    ranks = np.empty_like(values, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(len(values), dtype=np.float64)[:, None], axis=0)
    for j in range(values.shape[1]):
        unique, inverse = np.unique(values[:, j], return_inverse=True)
        if len(unique) < len(values):
            sums = np.bincount(inverse, weights=ranks[:, j])
            ranks[:, j] = (sums / np.bincount(inverse))[inverse]
    return ranks


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b``; ``[m]``.

    A column without variation in either input gives NaN (no ranking to compare).
    """
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    denominator = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=0) / denominator


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for finding the ``positive`` examples.

    The Mann-Whitney form: the probability that a random positive scores above a random
    negative, ties counting one half. Used for mislabel detection by self-influence.
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    count = int(positive.sum())
    if count == 0 or count == len(positive) or scores.shape != positive.shape:
        raise DaunceError(
            "roc_auc needs scores and a boolean mask of the same shape, with both positives "
            "and negatives."
        )
    ranks = average_ranks(scores[:, None])[:, 0] + 1.0
    negatives = len(scores) - count
    return float((ranks[positive].sum() - count * (count + 1) / 2) / (count * negatives))
